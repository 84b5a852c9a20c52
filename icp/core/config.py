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

Targets are an explicit allow-list of callables (``ALLOWED_CALLABLES``, ``ALLOWED_FAMILIES``),
matched on the module that defines the object; only the person running icp widens it
(``security.allowed_targets`` on the command line, ``$ICP_ALLOWED_TARGETS``). Interpolations may
use only OmegaConf's own data resolvers, and ``oc.env`` reads nothing unless the config names the
variable (``security.env``) and the person running icp approves it (``security.allowed_env`` on
the command line, ``$ICP_ALLOWED_ENV``); secret-looking names are never read. A YAML file holds at
most ``MAX_YAML_NODES`` nodes (alias bombs). A config downloaded from someone else cannot run code
or copy a key into a run directory.
"""

from __future__ import annotations

import math
import os
import re
import weakref
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from icp.core.errors import ConfigError

SAFE_RESOLVERS = {"oc.select", "oc.dict.keys", "oc.dict.values", "oc.create", "oc.env"}
# Every `${name:` in a string (whatever the spacing or nesting): a resolver call.
_RESOLVER_USE = re.compile(r"\$\{\s*([^\s:{}$]+)\s*:")
# Environment reads: a config names the variables it reads (security.env) and the person running it
# approves them (security.allowed_env on the command line, or this environment variable).
ALLOWED_ENV_ENV = "ICP_ALLOWED_ENV"
# The most YAML nodes (scalars, mappings, sequences, aliases counted each time they are used) one
# config file may hold: an alias bomb of a few hundred bytes expands to billions of nodes.
MAX_YAML_NODES = 200_000
_META_KEYS = ("defaults", "extends")


# ----------------------------------------------------------------------------------- loading


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes ``root`` stands for once every alias is expanded (what OmegaConf would build), counted
    without expanding: a shared node is sized once. Stops past ``limit``; a cycle is an error."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    active: set[int] = set()
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([c for kv in node.value for c in kv] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            active.discard(id(node))
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        if id(node) in active:
            raise ValueError("an alias refers to the node that contains it (a recursive structure)")
        active.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
        for c in children:
            if id(c) in active and id(c) not in sizes:
                raise ValueError("an alias refers to the node that contains it (a recursive structure)")
    return sizes[id(root)]


def safe_yaml(text: str, where: str, limit: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load`` of untrusted text, refusing alias bombs (more than ``limit`` nodes once
    aliases are expanded), recursive aliases and nesting too deep to parse, as one-line ConfigError."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            size = _expanded_size(node, limit)
            if size > limit:
                raise ConfigError(f"{where}: more than {limit} YAML nodes once aliases are expanded (an alias bomb?); "
                                  "write the config out without repeated aliases")
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not valid YAML ({getattr(err, 'problem', None) or _short(err)})") from None
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply to read") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {_shown(path)} (check the path; configs live in experiments/)")
    data = safe_yaml(path.read_text(), _shown(path))
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
    # The approvals of the person running icp may be given whether or not the config has the key.
    adding = adding or key in ("security.allowed_targets", "security.allowed_env")
    if not key:
        raise ConfigError(f"override '{item}' has no key")
    try:
        value = safe_yaml(raw, f"override '{key}'") if raw.strip() else None
    except ConfigError as err:
        raise ConfigError(f"{err}; quote the value, e.g. key='\"a{{b}}\"'") from None
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
    # Origins live beside the config (keyed by identity, dropped with it) so that errors raised
    # while instantiating can name the file that set a key, and approvals count only from the
    # command line.
    _ORIGINS[id(cfg)] = origins
    weakref.finalize(cfg, _ORIGINS.pop, id(cfg), None)
    check_interpolations(cfg)
    return cfg


def copy(cfg: DictConfig) -> DictConfig:
    """A deep copy that keeps the origins (and so the command-line approvals) of ``cfg``."""
    import copy as _copy

    new = _copy.deepcopy(cfg)
    _ORIGINS[id(new)] = dict(_ORIGINS.get(id(cfg), {}))
    weakref.finalize(new, _ORIGINS.pop, id(new), None)
    return new


_ORIGINS: dict[int, dict[str, str]] = {}


def origin_of(cfg: DictConfig, key: str) -> str:
    """The file (or 'command line') that last set ``key``, for error messages."""
    origins = _ORIGINS.get(id(cfg), {})
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return "the config"


_NO_DEFAULT = object()


def _env_names(root: Any, key: str) -> set[str]:
    try:
        value = OmegaConf.select(root, key, default=None, throw_on_resolution_failure=False)
    except OmegaConfBaseException:
        return set()
    if isinstance(value, str):
        return {value}
    return {str(v) for v in value} if isinstance(value, ListConfig) else set()


def approved_env(root: Any) -> set[str]:
    """Variables the person running icp approved: ``$ICP_ALLOWED_ENV`` (comma separated) and
    ``security.allowed_env`` when set on the command line (a config file cannot approve itself)."""
    approved = {p.strip() for p in os.environ.get(ALLOWED_ENV_ENV, "").split(",") if p.strip()}
    if isinstance(root, DictConfig) and origin_of(root, "security.allowed_env") == "command line":
        approved |= _env_names(root, "security.allowed_env")
    return approved


def _read_env(key: Any, default: Any = _NO_DEFAULT, *, _root_: Any = None) -> Any:
    """``${oc.env:NAME[,default]}`` with environment access denied by default: NAME must be named in
    the config's ``security.env`` and approved by the person running it, and never look secret.
    Called with the final name, so nested names, quoted names and defaults cannot get around it."""
    from icp.core.secrets import is_secret_name

    name = str(key)
    if is_secret_name(name):
        raise ConfigError(f"the config reads the secret-looking environment variable '{name}'; secrets must stay out of "
                          "configs (they are saved in every run directory): let the library that needs it read it")
    declared = _env_names(_root_, "security.env")
    if name not in declared or name not in approved_env(_root_):
        raise ConfigError(
            f"the config reads the environment variable '{name}', which is denied by default: the config must name "
            f"it (security.env: [{name}]) and you must approve it (security.allowed_env=[{name}] on the command line "
            f"or {ALLOWED_ENV_ENV}={name})")
    if name in os.environ:
        return os.environ[name]
    if default is _NO_DEFAULT:
        raise ConfigError(f"environment variable '{name}' is not set (the config reads it with ${{oc.env:{name}}})")
    return default if default is None else str(default)


OmegaConf.register_resolver("oc.env", _read_env, replace=True, annotation_validation="off")


def _gate_error(err: BaseException) -> ConfigError | None:
    """The ConfigError of the environment gate inside an OmegaConf resolution error, if any."""
    while err is not None:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__ or err.__context__
    return None


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
            for name in _RESOLVER_USE.findall(node):
                if name not in SAFE_RESOLVERS:
                    raise ConfigError(f"config key '{path}' uses resolver '{name}', which is not allowed "
                                      f"(allowed: {', '.join(sorted(SAFE_RESOLVERS))})")

    walk(cfg, "")
    # Resolve once now so that an environment read the gate refuses is reported at load, naming the
    # key; other resolution problems (e.g. a mandatory ??? still open) surface where they are used.
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        gate = _gate_error(err)
        if gate is not None:
            key = getattr(err, "full_key", None)
            raise ConfigError(f"config key '{key}': {gate}" if key else str(gate)) from None


# Counts every run config shares: (key, lowest value, highest value); None = unbounded. Checked by
# `check_values` before anything is built, so a typo is one line instead of a library traceback.
COUNT_BOUNDS = (("seed", 0, 2**32 - 1), ("trainer.max_steps", -1, None), ("trainer.max_epochs", -1, None),
                ("data.batch_size", 1, None), ("data.num_workers", 0, 1024), ("checkpoint.keep_last", -1, None),
                ("checkpoint.every_n_train_steps", 0, None), ("global_batch_size", 1, None))


def check_values(cfg: DictConfig) -> None:
    """Refuse NaN/inf anywhere in the resolved config and counts outside ``COUNT_BOUNDS``."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        gate = _gate_error(err)
        raise ConfigError(str(gate) if gate is not None else f"cannot resolve config: {_short(err)}") from None

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"config key '{path}' is {node}; only finite numbers are allowed")

    walk(data, "")
    for key, low, high in COUNT_BOUNDS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or value == "???":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"config key '{key}' is {value!r} (set in {origin_of(cfg, key)}); it must be an integer {span}")


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (what ``--dry-run`` prints and run directories keep)."""
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except OmegaConfBaseException as err:
        gate = _gate_error(err)
        raise ConfigError(str(gate) if gate is not None else f"cannot resolve config: {_short(err)}") from None


def save(cfg: DictConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A per-process temp name: under `srun` every rank writes the same config at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


# ------------------------------------------------------------------------------ instantiation
# The allow-listed builder lives in icp.core.targets; these two names are what callers use.


def validate(node: Any, cfg: DictConfig | None = None, path: str = "") -> None:
    """Check every ``_target_`` and its keys under ``node`` without building anything (icp.core.targets)."""
    from icp.core import targets

    targets.validate(node, cfg, path)


def instantiate(node: Any, cfg: DictConfig | None = None, path: str = "", **runtime: Any) -> Any:
    """Build ``node`` (one object per ``_target_`` node; icp.core.targets)."""
    from icp.core import targets

    return targets.instantiate(node, cfg, path, **runtime)
