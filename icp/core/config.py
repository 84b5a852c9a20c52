"""Config composition and instantiation.

A config is a YAML file that may build on others, either with ``defaults: [a, b]`` (merged in
order, then this file on top) or ``extends: a`` (one parent). Paths are relative to the file
that names them and the ``.yaml`` suffix is optional. Command-line overrides are OmegaConf
dotlists (``trainer.max_steps=10``); an override of a key that does not exist is an error
unless written ``+key=value``, so a typo never silently adds a dead key.

One object per node: a mapping with ``_target_`` is built by calling the target with the
mapping's other keys as keyword arguments (``_partial_: true`` returns a ``functools.partial``,
for optimizers and schedulers that need parameters later). A key the target does not accept is
an error naming the key, the file that set it and the keys the target accepts.

Targets resolve only inside an allow-list of module prefixes (``security.allowed_targets``
extends it), and interpolations may use only OmegaConf's own data resolvers, never one that
reads a secret from the environment: a config downloaded from someone else cannot run code or
copy a key into a run directory.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import weakref
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from icp.core.errors import ConfigError

DEFAULT_ALLOWED_TARGETS = (
    "icp",
    "torch",
    "lightning",
    "diffusers",
    "transformers",
    "torchmetrics",
    "peft",
)
# Resolvers that only select or reshape config data; anything else (including custom resolvers a
# third-party package may register) is refused.
ALLOWED_TARGETS_ENV = "ICP_ALLOWED_TARGETS"
# Callables inside allowed packages that load pickles, compile or fetch code: never config targets.
DENIED_TARGETS = ("torch.load", "torch.hub", "torch.utils.cpp_extension", "torch.jit.load", "torch.package",
                  "torch.serialization", "lightning.pytorch.core.saving",
                  "transformers.dynamic_module_utils", "diffusers.utils.dynamic_modules_utils")
# Keyword arguments that switch a safe loader into running code from a file or a hub repository.
DENIED_KWARGS = {"weights_only": False, "trust_remote_code": True, "allow_pickle": True}
DENIED_KWARG_NAMES = ("custom_pipeline",)
SAFE_RESOLVERS = {"oc.select", "oc.dict.keys", "oc.dict.values", "oc.create", "oc.env"}
SECRET_NAME = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD)$|^WANDB_API", re.IGNORECASE)
_RESOLVER_USE = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*:([^}]*)\}")
_META_KEYS = ("defaults", "extends")


# ----------------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {_shown(path)} (check the path; configs live in experiments/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{_shown(path)}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_shown(path)}: a config must be a YAML mapping, got {type(data).__name__}")
    return data


def _shown(path: Path) -> str:
    """A path as the user would write it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _resolve_parent(name: str, here: Path) -> Path:
    candidate = (here.parent / name).resolve()
    if candidate.suffix not in (".yaml", ".yml"):
        candidate = candidate.with_name(candidate.name + ".yaml")
    return candidate


def _record_origins(data: Any, file: Path, prefix: str, origins: dict[str, str]) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            origins[path] = _shown(file)
            _record_origins(value, file, path, origins)


def _compose(path: Path, origins: dict[str, str], chain: tuple[Path, ...]) -> DictConfig:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"config inheritance cycle: {cycle}")
    data = _read_yaml(path)
    parents: list[str] = []
    if "defaults" in data:
        defaults = data.pop("defaults")
        if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
            raise ConfigError(f"{_shown(path)}: 'defaults' must be a list of config paths")
        parents.extend(defaults)
    if "extends" in data:
        extends = data.pop("extends")
        if not isinstance(extends, str):
            raise ConfigError(f"{_shown(path)}: 'extends' must be one config path")
        parents.append(extends)
    merged = OmegaConf.create()
    for parent in parents:
        merged = OmegaConf.merge(merged, _compose(_resolve_parent(parent, path), origins, (*chain, path)))
    _record_origins(data, path, "", origins)
    try:
        return OmegaConf.merge(merged, OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{_shown(path)}: cannot merge onto its parents ({_short(err)})") from None


def _short(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def _apply_override(cfg: DictConfig, item: str, origins: dict[str, str]) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. trainer.max_steps=10)")
    key, _, raw = item.partition("=")
    adding = key.startswith("+")
    key = key.lstrip("+").strip()
    if not key:
        raise ConfigError(f"override '{item}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({getattr(err, 'problem', err)}); "
                          "quote it, e.g. key='\"a{b}\"'") from None
    parent_key, _, leaf_key = key.rpartition(".")
    parent_node = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    # A mandatory value (???) is a key that exists and waits for exactly this override.
    exists = isinstance(parent_node, DictConfig) and leaf_key in parent_node.keys()
    if not exists and not adding:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        known = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
        hint = f"; keys there: {', '.join(known)}" if known else ""
        raise ConfigError(f"override '{key}' names no existing config key (write +{key}=... to add one){hint}")
    if exists and not OmegaConf.is_missing(parent_node, leaf_key):
        old = OmegaConf.select(cfg, key)
        _check_type(key, old, value)
    try:
        OmegaConf.update(cfg, key, value, merge=True, force_add=adding)
    except OmegaConfBaseException as err:
        raise ConfigError(f"override '{item}': {_short(err)}") from None
    origins[key] = "command line"



def _check_type(key: str, old: Any, new: Any) -> None:
    """Refuse overrides whose value cannot stand where the old one stood (e.g. a word for a count)."""
    if old is None or new is None or isinstance(old, (DictConfig, ListConfig)):
        return
    if isinstance(old, bool):
        ok = isinstance(new, bool)
    elif isinstance(old, int):
        ok = isinstance(new, int) and not isinstance(new, bool)
    elif isinstance(old, float):
        ok = isinstance(new, (int, float)) and not isinstance(new, bool)
    else:
        ok = True
    if not ok:
        raise ConfigError(
            f"override '{key}={new}': expected a {type(old).__name__} like the current value {old!r}"
        )


def load(path: str | Path, overrides: Iterable[str] = ()) -> DictConfig:
    """Compose ``path`` with its parents, apply dotlist overrides, and check interpolations.

    The returned config carries the file each key came from (see :func:`origin_of`).
    """
    origins: dict[str, str] = {}
    cfg = _compose(Path(path), origins, ())
    for item in overrides:
        _apply_override(cfg, item, origins)
    check_interpolations(cfg)
    # Origins live beside the config (keyed by identity, dropped with it) so that errors raised
    # while instantiating can name the file that set a key.
    _ORIGINS[id(cfg)] = origins
    weakref.finalize(cfg, _ORIGINS.pop, id(cfg), None)
    return cfg


_ORIGINS: dict[int, dict[str, str]] = {}


def origin_of(cfg: DictConfig, key: str) -> str:
    """The file (or 'command line') that last set ``key``, for error messages."""
    origins = _ORIGINS.get(id(cfg), {})
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return "the config"


def check_interpolations(cfg: DictConfig) -> None:
    """Refuse resolvers outside the safe set, environment reads of secret-looking names, and
    literal copies of secret environment values (e.g. a shell-expanded ``$WANDB_API_KEY``)."""
    from icp.core.secrets import secret_values

    secrets = secret_values()

    def walk(node: Any, path: str) -> None:
        if isinstance(node, DictConfig):
            for key in node.keys():
                walk(node._get_node(key)._value(), f"{path}.{key}" if path else str(key))
        elif isinstance(node, ListConfig):
            for i in range(len(node)):
                walk(node._get_node(i)._value(), f"{path}[{i}]")
        elif isinstance(node, str):
            for value, env_name in secrets.items():
                if value in node:
                    raise ConfigError(f"config key '{path}' holds the value of the secret ${env_name}; secrets must "
                                      "stay out of configs (they are saved in every run directory)")
            for name, args in _RESOLVER_USE.findall(node):
                if name not in SAFE_RESOLVERS:
                    raise ConfigError(f"config key '{path}' uses resolver '{name}', which is not allowed "
                                      f"(allowed: {', '.join(sorted(SAFE_RESOLVERS))})")
                if name == "oc.env" and SECRET_NAME.search(args.split(",")[0].strip()):
                    raise ConfigError(f"config key '{path}' reads the secret '{args.split(',')[0].strip()}' from "
                                      "the environment; secrets must stay out of configs (pass them as env vars to "
                                      "the library that needs them)")

    walk(cfg, "")


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (what ``--dry-run`` prints and run directories keep)."""
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve config: {_short(err)}") from None


def save(cfg: DictConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A per-process temp name: under `srun` every rank writes the same config at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


# ------------------------------------------------------------------------------ instantiation


def allowed_targets(cfg: DictConfig | None) -> tuple[str, ...]:
    """Module prefixes ``_target_`` may name: the defaults, ``$ICP_ALLOWED_TARGETS`` (comma
    separated) and ``security.allowed_targets`` when it was set on the command line.

    A config file cannot widen the list itself: a downloaded YAML that trusted ``os`` would
    otherwise run any command it likes.
    """
    env = tuple(p.strip() for p in os.environ.get(ALLOWED_TARGETS_ENV, "").split(",") if p.strip())
    extra: tuple[str, ...] = ()
    if cfg is not None and origin_of(cfg, "security.allowed_targets") == "command line":
        extra = tuple(OmegaConf.select(cfg, "security.allowed_targets", default=None) or ())
    return DEFAULT_ALLOWED_TARGETS + env + extra


def locate(name: str, allowed: Iterable[str] = DEFAULT_ALLOWED_TARGETS, where: str = "the config") -> Any:
    """Import ``pkg.mod.Attr`` if it lies under an allowed module prefix."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", name):
        raise ConfigError(f"{where}: _target_ {name!r} is not a dotted import path like 'torch.optim.AdamW'")
    allowed = tuple(allowed)
    if any(name == p or name.startswith(p + ".") for p in DENIED_TARGETS):
        raise ConfigError(f"{where}: _target_ '{name}' can load or compile code and is never allowed in a config")
    if not any(name == p or name.startswith(p + ".") for p in allowed):
        raise ConfigError(f"{where}: _target_ '{name}' is outside the allowed modules ({', '.join(allowed)}); "
                          f"if you trust it, pass security.allowed_targets=[{name.split('.')[0]}] on the command "
                          f"line or set {ALLOWED_TARGETS_ENV} (a config file cannot extend the list itself)")
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue
            raise
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"{where}: _target_ '{name}' cannot be imported (check the spelling)")


def accepted_keys(target: Any) -> tuple[set[str], bool]:
    """Keyword names ``target`` accepts and whether it also takes ``**kwargs``."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def validate(node: Any, cfg: DictConfig | None = None, path: str = "") -> None:
    """Check every ``_target_`` below ``node`` imports and accepts its keys, building nothing.

    Mandatory values left open (``???``) are allowed here, so configs for real weights that
    need a user's path can be checked too.
    """
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    _build(node, cfg, path, allowed_targets(cfg), {}, call=False)


def instantiate(node: Any, cfg: DictConfig | None = None, path: str = "", **runtime: Any) -> Any:
    """Build the object a config node describes (recursively; see the module docstring).

    ``cfg`` is the whole loaded config (for error origins and the target allow-list); ``runtime``
    keyword arguments are objects built elsewhere and injected (e.g. callbacks into a Trainer).
    """
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            node = OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"config key '{path}': {_short(err)}") from None
    return _build(node, cfg, path, allowed_targets(cfg), runtime)


def _build(node: Any, cfg: DictConfig | None, path: str, allowed: tuple[str, ...], runtime: dict,
           call: bool = True) -> Any:
    if isinstance(node, list):
        return [_build(v, cfg, f"{path}[{i}]", allowed, {}, call) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {k: _build(v, cfg, f"{path}.{k}" if path else k, allowed, {}, call) for k, v in node.items()}
    where = f"{origin_of(cfg, path) if cfg is not None else 'the config'} ({path or 'root'})"
    target = locate(node["_target_"], allowed, where)
    partial = bool(node.get("_partial_", False))
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "_partial_")}
    for key, value in kwargs.items():
        if key in DENIED_KWARG_NAMES or (key in DENIED_KWARGS and value == DENIED_KWARGS[key]):
            raise ConfigError(f"config key '{path}.{key}' (set in {origin_of(cfg, f'{path}.{key}') if cfg is not None else 'the config'}) "
                              "would let a loader run code from a file or hub; it is refused in configs")
    names, var_kw = accepted_keys(target)
    if not var_kw:
        for key in list(kwargs) + list(runtime):
            if key not in names:
                file = origin_of(cfg, f"{path}.{key}") if cfg is not None else "the config"
                raise ConfigError(
                    f"config key '{path + '.' if path else ''}{key}' (set in {file}) is not accepted by "
                    f"{node['_target_']}; accepted keys: {', '.join(sorted(names)) or '(none)'}"
                )
    built = {k: _build(v, cfg, f"{path}.{k}" if path else k, allowed, {}, call) for k, v in kwargs.items()}
    if not call:
        return None
    built.update(runtime)
    if partial:
        return functools.partial(target, **built)
    try:
        return target(**built)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {node['_target_']} rejected its arguments: {_short(err)}") from None
