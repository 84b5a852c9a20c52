"""What a config may build, and building it: the ``_target_`` allow-list and the instantiation.

One object per node: a mapping with ``_target_`` is built by calling the target with the mapping's
other keys as keyword arguments (``_partial_: true`` returns a ``functools.partial``). A key the
target does not accept is an error naming the key, the file that set it and the keys it accepts.
Targets are an explicit allow-list of callables (``ALLOWED_CALLABLES``, ``ALLOWED_FAMILIES``),
matched on the module that defines the object; only the person running icp widens it
(``security.allowed_targets`` on the command line, ``$ICP_ALLOWED_TARGETS``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import re
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from icp.core.config import _short, origin_of
from icp.core.errors import ConfigError

# What a config may build: an explicit allow-list of callables, never whole packages (torch,
# lightning, diffusers and transformers hold many functions that run shell commands, load shared
# libraries or unpickle files). A ``_target_`` is resolved by importing its module and taking one
# attribute; the object must be a class or function *defined* where the allow-list says (its
# ``__module__``/``__qualname__``), so ``torch.os.system`` or ``icp.core.config.os.system`` never
# resolve to the shell. Exact callables, by defining module and qualified name:
ALLOWED_CALLABLES = frozenset({
    "lightning.pytorch.trainer.trainer.Trainer",
    "icp.models.backbone.tiny",
    "icp.models.backbone.pretrained",
    "icp.models.backbone.sd15",
    "icp.models.backbone.sd15_architecture",
})
# Families: classes defined under a module prefix that derive from a base class of that family.
ALLOWED_FAMILIES = (
    ("torch.optim", "torch.optim.optimizer.Optimizer"),
    ("torch.optim.lr_scheduler", "torch.optim.lr_scheduler.LRScheduler"),
    ("torch.nn.modules", "torch.nn.modules.module.Module"),
    ("diffusers.schedulers", "diffusers.schedulers.scheduling_utils.SchedulerMixin"),
    ("diffusers.models", "diffusers.models.modeling_utils.ModelMixin"),
    ("lightning.pytorch.callbacks", "lightning.pytorch.callbacks.callback.Callback"),
    ("lightning.pytorch.loggers", "lightning.pytorch.loggers.logger.Logger"),
    ("icp", "lightning.pytorch.core.module.LightningModule"),
    ("icp", "lightning.pytorch.core.datamodule.LightningDataModule"),
    ("icp", "lightning.pytorch.callbacks.callback.Callback"),
    ("icp", "torch.nn.modules.module.Module"),
)
ALLOWED_TARGETS_ENV = "ICP_ALLOWED_TARGETS"
# Never allowed, even when widened: named for a clearer message (the allow-list refuses them anyway).
DENIED_TARGETS = ("torch.load", "torch.hub", "torch.utils.cpp_extension", "torch.jit.load", "torch.package",
                  "torch.serialization", "lightning.pytorch.core.saving",
                  "transformers.dynamic_module_utils", "diffusers.utils.dynamic_modules_utils")
# Keyword arguments that switch a safe loader into running code from a file or a hub repository.
DENIED_KWARGS = {"weights_only": False, "trust_remote_code": True, "allow_pickle": True}
DENIED_KWARG_NAMES = ("custom_pipeline",)
# Resolvers that only select or reshape config data (oc.env is replaced by the gated reader below);
# anything else (including custom resolvers a third-party package may register) is refused.
def allowed_targets(cfg: DictConfig | None) -> tuple[str, ...]:
    """What widens the allow-list: ``$ICP_ALLOWED_TARGETS`` (comma separated) and
    ``security.allowed_targets`` when it was set on the command line. Each entry is a module prefix
    (``tests``) or an exact name; it matches the module an object is *defined* in.

    A config file cannot widen the list itself: a downloaded YAML that trusted ``os`` would
    otherwise run any command it likes.
    """
    env = tuple(p.strip() for p in os.environ.get(ALLOWED_TARGETS_ENV, "").split(",") if p.strip())
    extra: tuple[str, ...] = ()
    if cfg is not None and origin_of(cfg, "security.allowed_targets") == "command line":
        extra = tuple(str(x) for x in (OmegaConf.select(cfg, "security.allowed_targets", default=None) or ()))
    return env + extra


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _defined_object(name: str) -> Any:
    """The class or function ``name`` names: its module imported, one attribute taken, and the
    object found again under its own ``__module__``/``__qualname__`` (so no attribute walk through
    another module, and no module, builtin or bound method); None when there is no such object."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # includes ModuleNotFoundError: 'torch.os' is an attribute, not a module
        return None
    except Exception:  # noqa: BLE001 - a broken third-party module is "cannot be imported"
        return None
    obj = getattr(module, attr, None)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return None
    home = sys.modules.get(getattr(obj, "__module__", "") or "")
    qualname = getattr(obj, "__qualname__", "")
    if home is None or "<" in qualname:
        return None
    found: Any = home
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return obj if found is obj else None


def _canonical(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _base(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def target_allowed(obj: Any, widened: Iterable[str] = ()) -> bool:
    """Whether a config may build ``obj`` (a class or function found by :func:`_defined_object`)."""
    canonical = _canonical(obj)
    if canonical in ALLOWED_CALLABLES:
        return True
    if any(_under(canonical, p) or _under(obj.__module__, p) for p in widened):
        return not any(_under(canonical, d) for d in DENIED_TARGETS)
    if not inspect.isclass(obj):
        return False
    for prefix, base in ALLOWED_FAMILIES:
        if _under(obj.__module__, prefix) and issubclass(obj, _base(base)):
            return True
    return False


def locate(name: str, allowed: Iterable[str] = (), where: str = "the config") -> Any:
    """The class or function ``_target_: name`` may build (see ``ALLOWED_CALLABLES``/``ALLOWED_FAMILIES``);
    ``allowed``: module prefixes or names trusted beyond them (from the command line or environment)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", name):
        raise ConfigError(f"{where}: _target_ {name!r} is not a dotted import path like 'torch.optim.AdamW'")
    allowed = tuple(allowed)
    if any(_under(name, p) for p in DENIED_TARGETS):
        raise ConfigError(f"{where}: _target_ '{name}' can load or compile code and is never allowed in a config")
    obj = _defined_object(name)
    if obj is None:
        raise ConfigError(f"{where}: _target_ '{name}' is outside the allowed targets: it is not a class or Python "
                          "function defined in an importable module (check the spelling; e.g. torch.optim.AdamW)")
    if not target_allowed(obj, allowed):
        raise ConfigError(
            f"{where}: _target_ '{name}' ({_canonical(obj)}) is outside the allowed targets (icp's tasks, data "
            "modules, callbacks, nets and backbone builders; torch.optim, torch.optim.lr_scheduler, torch.nn "
            "modules; diffusers schedulers and models; Lightning's Trainer, callbacks and loggers); if you trust "
            f"it, pass security.allowed_targets=[{obj.__module__}] on the command line or set {ALLOWED_TARGETS_ENV} "
            "(a config file cannot extend the list itself)")
    return obj


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


def _library_config_errors() -> tuple[type, ...]:
    """Exceptions libraries raise for a bad argument (Lightning's MisconfigurationException)."""
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # pragma: no cover
        return ()
    return (MisconfigurationException,)


def _build(node: Any, cfg: DictConfig | None, path: str, allowed: tuple[str, ...], runtime: dict,
           call: bool = True) -> Any:
    if isinstance(node, list):
        return [_build(v, cfg, f"{path}[{i}]", allowed, {}, call) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {k: _build(v, cfg, f"{path}.{k}" if path else k, allowed, {}, call) for k, v in node.items()}
    where = f"{origin_of(cfg, path) if cfg is not None else 'the config'} ({path or 'root'})"
    partial = bool(node.get("_partial_", False))
    kwargs = {k: v for k, v in node.items() if k not in ("_target_", "_partial_")}
    for key, value in kwargs.items():
        if key in DENIED_KWARG_NAMES or (key in DENIED_KWARGS and value == DENIED_KWARGS[key]):
            raise ConfigError(f"config key '{path}.{key}' (set in {origin_of(cfg, f'{path}.{key}') if cfg is not None else 'the config'}) "
                              "would let a loader run code from a file or hub; it is refused in configs")
    target = locate(node["_target_"], allowed, where)
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
    except (TypeError, ValueError, *_library_config_errors()) as err:
        raise ConfigError(f"{where}: {node['_target_']} rejected its arguments: {_short(err)}") from None
