"""Run directories: ``<run.root>/<experiment>/<name>/`` with config, checkpoints, logs, samples.

Resumable by default (edm2, DESIGN.md §4): running the same command again lands in the same
directory and continues from its last checkpoint, which is what SLURM requeue needs. When no
``run.name`` is given the name is a hash of the resolved config, so the same command maps to the
same directory and a changed config to a new one. A named run whose saved config differs from
the new one is refused (naming the differing keys) instead of silently mixing two experiments;
``run.allow_config_change=true`` accepts the change on purpose.

A run's identity is what it computes, not how long, on how many devices or where it logs:
``run.*``, ``logger.*``, ``trainer.max_steps`` and the process layout
(``trainer.accelerator/devices/num_nodes/strategy``; with ``global_batch_size`` set also the
per-device batch and accumulation it implies) neither enter the hash nor count as a change, so
raising max_steps continues the run and 1 vs 8 GPUs share one directory
(docs/decisions/run-identity.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from icp.core import config as cfglib
from icp.core.errors import ConfigError

CONFIG_FILE = "config.yaml"
# Keys that say where/how a run is stored or logged, not what it computes: they do not enter the
# hash and may change between invocations of the same run (W&B offline -> online is the same run).
_VOLATILE = ("run", "logger")
# Keys that say how long or on which processes a run computes, not what (docs/decisions/run-identity.md).
_SCHEDULE = ("trainer.max_steps", "trainer.enable_progress_bar")
# (trainer.strategy: by name only; a configured strategy object stays part of what runs.)
_LAYOUT = ("trainer.accelerator", "trainer.devices", "trainer.num_nodes")
# With global_batch_size set, the optimizer's batch is fixed and these only split it over processes.
_BATCH_SPLIT = ("data.batch_size", "trainer.accumulate_grad_batches")
_GLOBAL_BATCH_CALLBACK = "icp.cluster.slurm.GlobalBatchSize"


def _pop(data: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.get(part) if isinstance(data, dict) else None
    if isinstance(data, dict):
        data.pop(last, None)


def identity(data: dict) -> dict:
    """The part of a resolved config (a plain dict) that names a run: ``data`` without the keys
    that only say where it is stored, how long it trains or how it is spread over processes."""
    data = json.loads(json.dumps(data, default=str))  # a deep copy we may edit
    for key in _VOLATILE:
        data.pop(key, None)
    for key in _SCHEDULE + _LAYOUT + (_BATCH_SPLIT if data.get("global_batch_size") else ()):
        _pop(data, key)
    trainer = data.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("strategy"), str):
        trainer.pop("strategy")
    if data.get("global_batch_size") and isinstance(data.get("callbacks"), dict):
        for node in data["callbacks"].values():
            if isinstance(node, dict) and node.get("_target_") == _GLOBAL_BATCH_CALLBACK:
                node.pop("per_device_batch_size", None)
    return data


def config_hash(cfg: DictConfig) -> str:
    data = identity(yaml.safe_load(cfglib.to_yaml(cfg)))
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


# One path component: a config's experiment or run.name cannot leave run.root ('..', '/') or carry
# control characters (a newline would end a line of the sbatch script that names the directory).
_COMPONENT = re.compile(r"[A-Za-z0-9_+=,@-][A-Za-z0-9_.+=,@-]*")


def run_dir_of(cfg: DictConfig) -> Path:
    experiment = OmegaConf.select(cfg, "experiment", default=None) or "default"
    name = OmegaConf.select(cfg, "run.name", default=None) or f"cfg-{config_hash(cfg)}"
    root = str(OmegaConf.select(cfg, "run.root", default="runs"))
    for key, value in (("experiment", experiment), ("run.name", name)):
        if not _COMPONENT.fullmatch(str(value)):
            raise ConfigError(f"{key}={str(value)!r} cannot name a run directory: use letters, digits and _ . + = , @ - "
                              "(no '/', no leading '.', no spaces or control characters)")
    if any(ord(c) < 32 or ord(c) == 127 or c in "\u2028\u2029\x85" for c in root):
        raise ConfigError(f"run.root={root!r} cannot hold a run directory: it contains control characters")
    return Path(root) / str(experiment) / str(name)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}.{key}" if prefix else str(key)
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(_diff(a, b, path))
        elif a != b:
            keys.append(path)
    return keys


def changed_keys(cfg: DictConfig) -> tuple[Path, list[str]]:
    """The run directory of ``cfg`` and the keys its saved config differs in (identity keys only);
    raises when they differ and the config does not accept the change. Creates nothing."""
    run_dir = run_dir_of(cfg)
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        return run_dir, []
    old = cfglib.safe_yaml(saved.read_text(), str(saved)) or {}  # a copied run dir may hold anything
    if not isinstance(old, dict):
        raise ConfigError(f"{saved}: not a config (a YAML mapping); move the run directory away")
    changed = _diff(identity(old), identity(yaml.safe_load(cfglib.to_yaml(cfg))))
    if changed and not OmegaConf.select(cfg, "run.allow_config_change", default=False):
        shown = ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
        raise ConfigError(
            f"{run_dir} holds a run with a different config (changed: {shown}); choose another "
            "run.name, or pass run.allow_config_change=true to continue it with the new config"
        )
    return run_dir, changed


def prepare(cfg: DictConfig) -> Path:
    """Create (or re-open) the run directory and write the resolved config into it."""
    run_dir, changed = changed_keys(cfg)
    saved = run_dir / CONFIG_FILE
    if changed:
        # Keep the history of accepted changes instead of overwriting the old config.
        n = len(list(run_dir.glob("config.*.yaml")))
        saved.replace(run_dir / f"config.{n}.yaml")
    for sub in ("checkpoints", "samples", "logs"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    cfglib.save(cfg, saved)
    return run_dir

