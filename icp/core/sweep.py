"""Sweeps: ``icp fit CONFIG -m key=a,b other=x,y`` is the grid of every combination, one ordinary
run directory per point (lightning-hydra-template's basic-sweeper syntax for lists).

An override whose value holds a comma outside brackets is an axis; the others hold for every
point. Axis values come from an allow-list of characters (numbers, names, paths) because each
lands in a run's config, a manifest and, under Slurm, a job script; the grid has at most
``MAX_POINTS`` points. The manifest ``<run.root>/<experiment>/sweeps/<sweep-id>/sweep.json`` lists
the points and their run directories, which ``icp leaderboard`` reads as one table. The sweep id
is a hash of the command, so running the same sweep again resumes it point by point.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from icp.core import config as cfglib
from icp.core import rundir
from icp.core.errors import ConfigError

SCHEMA = "icp-sweep/1"
MANIFEST = "sweep.json"
MAX_POINTS = 256
# An axis value: numbers (1e-4, -3), names, true/false/null, relative paths. Nothing that quotes,
# nests or ends a line, so a value means the same in the config, the manifest and a job script.
_VALUE = re.compile(r"[A-Za-z0-9_.+\-/:@]+")
_KEY = re.compile(r"\+{0,2}[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
# What says where a run lives or what it may load: not something a sweep varies.
_FIXED_ROOTS = ("run", "experiment", "security")
_OPEN = {"[": "]", "{": "}", "(": ")"}


def split_values(value: str) -> list[str]:
    """``a,b`` -> [a, b]; commas inside brackets or quotes do not split (``[1,2]`` is one list)."""
    parts, depth, quote, start = [], [], None, 0
    for i, ch in enumerate(value):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth.append(_OPEN[ch])
        elif depth and ch == depth[-1]:
            depth.pop()
        elif ch == "," and not depth:
            parts.append(value[start:i])
            start = i + 1
    return parts + [value[start:]]


@dataclass
class Sweep:
    config: str                   # the config path as given
    fixed: list[str]              # overrides every point shares
    axes: dict[str, list[str]]    # override key (as written, '+' included) -> values, in the given order

    @property
    def points(self) -> list[list[str]]:
        """Each point's full override list: the shared ones, then its axis values."""
        keys = list(self.axes)
        return [self.fixed + [f"{k}={v}" for k, v in zip(keys, combo)]
                for combo in itertools.product(*(self.axes[k] for k in keys))]

    @property
    def sweep_id(self) -> str:
        text = json.dumps([self.config, self.fixed, list(self.axes.items())])
        return "sweep-" + hashlib.sha256(text.encode()).hexdigest()[:10]


def parse(config: str, overrides: list[str]) -> Sweep:
    """The grid the overrides describe; one-line ConfigError for anything a sweep cannot take."""
    fixed: list[str] = []
    axes: dict[str, list[str]] = {}
    seen: set[str] = set()
    for item in overrides:
        if any(ch in item for ch in "\n\r\x00\x85\u2028\u2029"):
            raise ConfigError(f"sweep override {item[:60]!r} holds a line break; write each override on one line")
        key, sep, value = item.partition("=")
        if not sep or not _KEY.fullmatch(key):
            raise ConfigError(f"sweep override {item[:60]!r} is not key=value (e.g. model.optimizer.lr=1e-4,3e-4)")
        name = key.lstrip("+")
        if name in seen:
            raise ConfigError(f"sweep override key {name} is given twice; list its values once: {name}=a,b")
        seen.add(name)
        if re.fullmatch(r"\s*range\(.*\)\s*", value):
            raise ConfigError(f"{item}: range(...) sweeps are not supported; list the values: {name}=1,2,3")
        values = split_values(value)
        if len(values) == 1:
            if "," in value and any(q in value for q in "'\""):
                raise ConfigError(f"{item}: a comma inside quotes is ambiguous in a sweep; sweep values are "
                                  "plain (letters, digits and _ . + - / : @), separated by commas")
            fixed.append(item)
            continue
        if name.split(".")[0] in _FIXED_ROOTS:
            raise ConfigError(f"{item}: {name} cannot be swept (it says where runs live or what they may load); "
                              "sweep settings of data, model, trainer, ...")
        for v in values:
            if not _VALUE.fullmatch(v):
                raise ConfigError(f"{item}: sweep value {v[:40]!r} must be non-empty letters, digits and "
                                  "_ . + - / : @ (no quotes, spaces or brackets)")
        if len(set(values)) != len(values):
            raise ConfigError(f"{item}: a value is listed twice")
        axes[key] = values
    size = 1
    for values in axes.values():
        size *= len(values)
    if size > MAX_POINTS:
        shown = " x ".join(str(len(v)) for v in axes.values())
        raise ConfigError(f"the sweep has {size} points ({shown}); at most {MAX_POINTS}: sweep fewer values")
    return Sweep(config=str(config), fixed=fixed, axes=axes)


@dataclass
class Plan:
    sweep: Sweep
    configs: list[DictConfig]     # one resolved config per point, in the order of sweep.points
    run_dirs: list[Path]

    @property
    def directory(self) -> Path:
        """``<run.root>/<experiment>/sweeps/<sweep-id>/`` (the points share root and experiment)."""
        first = self.run_dirs[0]
        return first.parent / "sweeps" / self.sweep.sweep_id


def plan(config: str, overrides: list[str], prepare=None) -> Plan:
    """Parse, load every point's config (``prepare(cfg)`` may adjust it, e.g. for Slurm) and check
    that the points are distinct runs; nothing is written."""
    sweep = parse(config, overrides)
    configs, dirs = [], []
    for point in sweep.points:
        cfg = cfglib.load(config, point)
        cfglib.check_values(cfg)
        if prepare is not None:
            cfg = prepare(cfg)
        configs.append(cfg)
        dirs.append(rundir.run_dir_of(cfg))
    for i, d in enumerate(dirs):
        if d in dirs[:i]:
            j = dirs.index(d)
            raise ConfigError(
                f"sweep points {j} and {i} map to one run directory {d} (a fixed run.name, or an axis that does "
                "not change a run's identity: trainer.max_steps, the device count); drop run.name or sweep another key")
    return Plan(sweep=sweep, configs=configs, run_dirs=dirs)


def manifest(p: Plan) -> dict:
    return {"schema": SCHEMA, "config": p.sweep.config, "axes": {k.lstrip("+"): v for k, v in p.sweep.axes.items()},
            "points": [{"overrides": o, "run_dir": d.as_posix()} for o, d in zip(p.sweep.points, p.run_dirs)]}


def write_manifest(p: Plan) -> Path:
    """``sweep.json`` (atomically), before any point trains, so a partial sweep is readable."""
    path = p.directory / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest(p), indent=1) + "\n")
    tmp.replace(path)
    return path


def describe(p: Plan, i: int) -> str:
    """Point ``i`` as its axis overrides (what sets it apart)."""
    return " ".join(p.sweep.points[i][len(p.sweep.fixed):])
