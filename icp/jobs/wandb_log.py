"""W&B for ``icp run``: one group per run, a job type per stage, evaluation and report logged.

- Every fit stage of one ``icp run`` logs with ``group=<experiment>/<run name>`` and
  ``job_type=<stage>``; the ``evaluate`` and ``report`` steps open their own W&B runs in the same
  group (``job_type`` evaluate / report) in the main job's root (``<run_dir>/wandb/``).
- One switch: the run config's top-level ``wandb`` (offline | online | disabled; offline when
  absent) applies to every stage whose ``logger.wandb`` is not null (a stage's
  ``logger.wandb=null`` keeps it off). Online needs an API key, checked before anything trains.
- The W&B settings say where a stage is logged, not what it computes: ``logger.*`` is not part of
  a run's identity (icp.core.rundir), so switching W&B online or off (or renaming the ``icp run``,
  which renames the group) reuses every trained stage.

evaluate logs the headline metrics with their 95 % intervals and baselines to the run summary and
the per-pair scores as a ``wandb.Table``; report logs the report's pictures as ``wandb.Image``
from the PNG files' uint8 pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import netrc
import os
import re
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from icp.core import config as cfglib
from icp.core import rundir
from icp.core.errors import ConfigError
from icp.core.secrets import redact_tree

MODES = ("offline", "online", "disabled")


def run_mode(cfg: DictConfig) -> str | None:
    """The run config's ``wandb`` switch; None when the config does not set one."""
    if "wandb" not in cfg:
        return None
    value = cfg.wandb
    if value is None or value is False:  # `wandb: null` / `wandb: false` read as off
        return "disabled"
    if value not in MODES:
        raise ConfigError(f"wandb={value!r} (from {cfglib.origin_of(cfg, 'wandb')}): use one of "
                          f"{', '.join(MODES)} (e.g. `icp run CONFIG wandb=online`)")
    return str(value)


def group_of(cfg: DictConfig) -> str:
    """The W&B group of one ``icp run``: its run directory's experiment and name."""
    run_dir = rundir.run_dir_of(cfg)
    return f"{run_dir.parent.name}/{run_dir.name}"


def stage_config(fit: DictConfig, cfg: DictConfig, stage: str) -> DictConfig:
    """A fit stage's config with the run's W&B group, job type and mode (see the module docstring)."""
    if OmegaConf.select(fit, "logger.wandb", default=None) is None:
        return fit
    mode = run_mode(cfg)
    if mode == "disabled":
        OmegaConf.update(fit, "logger.wandb", None, merge=False)
        return fit
    node = fit.logger.wandb
    with_flags = OmegaConf.to_container(node, resolve=False)
    with_flags.update(group=group_of(cfg), job_type=stage, **({"mode": mode} if mode else {}))
    OmegaConf.update(fit, "logger.wandb", with_flags, merge=False)
    return fit


def settings(cfg: DictConfig, fits: list[DictConfig]) -> dict | None:
    """W&B settings of the evaluate / report runs: the run's switch, the fit stages' project and
    entity; None when W&B is off (the switch says disabled, or every stage turned it off)."""
    mode = run_mode(cfg)
    nodes = [OmegaConf.to_container(f.logger.wandb, resolve=True)
             for f in fits if OmegaConf.select(f, "logger.wandb", default=None) is not None]
    if mode == "disabled" or (mode is None and not nodes):
        return None
    first = nodes[0] if nodes else {}
    config = redact_tree(json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str)))
    out = {"mode": mode or first.get("mode", "offline"), "project": first.get("project", "icp"),
           "group": group_of(cfg), "config": config}
    if first.get("entity"):
        out["entity"] = first["entity"]
    return out


def has_api_key(environ=os.environ) -> bool:
    """An API key W&B can use: ``WANDB_API_KEY`` or a ``wandb login`` entry in ~/.netrc."""
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_online(modes: list[str]) -> None:
    """Refuse online logging without an API key, before anything trains."""
    if "online" in modes and not has_api_key():
        raise ConfigError("W&B online needs an API key: set WANDB_API_KEY (or run `wandb login`), or log offline "
                          "(wandb=offline) and upload later with `wandb sync`")


def fit_modes(fits: list[DictConfig]) -> list[str]:
    return [str(OmegaConf.select(f, "logger.wandb.mode", default="offline"))
            for f in fits if OmegaConf.select(f, "logger.wandb", default=None) is not None]


def _open(run_dir: Path, opts: dict, job_type: str):
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    # A stable id per run directory and step: re-running the step appends to the same W&B run.
    key = hashlib.sha256(f"{Path(run_dir).resolve()}:{job_type}".encode()).hexdigest()[:12]
    return wandb.init(dir=str(run_dir), id=f"icp-{job_type}-{key}", resume="allow", job_type=job_type,
                      name=f"{opts['group']}/{job_type}", **opts)


def _interval(row: dict, intervals: dict) -> tuple[float, float] | None:
    """A metric's 95 % interval: the record's numeric ``intervals`` entry, else the row's
    '0.41 [0.38, 0.44] (...)' text (records written before icp-metrics/2)."""
    found = intervals.get(row.get("name")) or row.get("interval")
    if isinstance(found, dict) and "lo" in found:
        return float(found["lo"]), float(found["hi"])
    m = re.search(r"\[(-?[\d.]+(?:e-?\d+)?|nan), (-?[\d.]+(?:e-?\d+)?|nan)\]", str(found or ""))
    return (float(m.group(1)), float(m.group(2))) if m else None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summary_of(evaluation: dict) -> dict:
    """The headline metrics: ``eval/<m>`` with ``/lo`` ``/hi``, ``eval/<m>@<baseline>`` and the
    paired differences ``eval/<m>-<baseline>`` with ``/lo`` ``/hi`` ``/verdict`` (the names the
    in-loop evaluation logs, icp.eval.callbacks)."""
    out: dict = {"eval/summary": evaluation.get("summary", "")}
    # icp-metrics/2 keeps the report's rows under "rows"; earlier main-job records under "metrics"
    rows = evaluation.get("rows") or [r for r in evaluation.get("metrics") or [] if isinstance(r, dict)]
    intervals = evaluation.get("intervals") or {}
    for row in rows:
        name = row.get("name")
        if not name or not _number(row.get("value")):
            continue
        out[f"eval/{name}"] = float(row["value"])
        interval = _interval(row, intervals)
        if interval and all(map(_number, interval)):
            out[f"eval/{name}/lo"], out[f"eval/{name}/hi"] = interval
        for arm, value in (row.get("baselines") or {}).items():
            if _number(value):
                out[f"eval/{name}@{arm}"] = float(value)
        for arm, versus in (row.get("versus") or {}).items():
            for k in ("mean", "lo", "hi"):
                if _number(versus.get(k)):
                    out[f"eval/{name}-{arm}" + ("" if k == "mean" else f"/{k}")] = float(versus[k])
            if versus.get("verdict"):
                out[f"eval/{name}-{arm}/verdict"] = versus["verdict"]
    return out


def pair_table(per_pair: dict[str, list[dict]]) -> tuple[list[str], list[list]]:
    """One row per held-out pair: identity, pair index, every per-pair metric of the method and of
    each baseline (``<metric>@<baseline>``); arms are aligned pair by pair."""
    method = per_pair.get("method", [])
    arms = [a for a in per_pair if a != "method"]
    names = sorted({k for r in method for k in r if k != "identity"})
    columns = ["identity", "pair", *names, *[f"{n}@{a}" for a in arms for n in names]]
    rows = []
    for i, row in enumerate(method):
        cells = [int(row.get("identity", -1)), i, *[row.get(n) for n in names]]
        for arm in arms:
            other = per_pair[arm][i] if i < len(per_pair[arm]) else {}
            cells += [other.get(n) for n in names]
        rows.append([float(c) if isinstance(c, float) else c for c in cells])
    return columns, rows


def image_of(path: Path, caption: str = ""):
    """A report picture as ``wandb.Image`` from the file's uint8 pixels (never [0, 1] floats)."""
    import numpy as np
    import wandb
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return wandb.Image(pixels, caption=caption)


def log_evaluate(opts: dict | None, run_dir: Path, metrics: Path) -> None:
    """The evaluate step's metrics (summary) and per-pair scores (table) into its W&B run."""
    if opts is None:
        return
    import wandb

    evaluation = json.loads(Path(metrics).read_text())
    run = _open(Path(run_dir), opts, "evaluate")
    try:
        columns, rows = pair_table(evaluation.get("per_pair") or {})
        if rows:
            run.log({"eval/pairs": wandb.Table(columns=columns, data=rows)})
        run.summary.update(summary_of(evaluation))
    finally:
        run.finish()


def log_report(opts: dict | None, run_dir: Path, pictures: list[tuple[Path, str]]) -> None:
    """The report's pictures (``report/<name>``) and its headline into the report's W&B run."""
    if opts is None:
        return
    run = _open(Path(run_dir), opts, "report")
    try:
        run.log({f"report/{Path(p).stem}": image_of(p, caption) for p, caption in pictures if Path(p).is_file()})
        metrics = Path(run_dir) / "evaluate" / "metrics.json"
        if metrics.is_file():
            run.summary["eval/summary"] = json.loads(metrics.read_text()).get("summary", "")
    finally:
        run.finish()
