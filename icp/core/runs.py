"""One answer to "which run is this path?", shared by every verb that reads a finished run.

A user may pass any of these (issue 28):

- an ``icp fit`` run: ``<run.root>/<experiment>/<name>/`` holding ``config.yaml`` and ``checkpoints/``;
  a fit of the main job (``<main>/stages/<stage>/cfg-<hash>/``) and of a claims study
  (``<root>/fits/<experiment>/cfg-<hash>/``) are such runs too;
- a checkpoint (``.ckpt``) in a run's ``checkpoints/``;
- the root of the main job (``icp run``: ``stages.json``, ``stages/<stage>/cfg-<hash>/``,
  ``evaluate/metrics.json``): its model is the adaptation stage's run;
- a ``metrics.json`` (from ``icp eval`` or the main job's evaluate stage).

A sweep (``icp fit -m``: ``<run.root>/<experiment>/sweeps/<id>/sweep.json``) is many runs:
:func:`sweep_points` lists them for the verbs that take a sweep whole (``icp eval``,
``icp leaderboard``); ``resolve`` says so in one line.

``resolve`` reads only the file-system conventions (config files, stage records, checkpoint
steps): nothing is imported or built. Paths stored in a run's files are relative to the folder the
job ran in; they are looked up relative to that folder as inferred from the run's own location
(a run copied elsewhere together with its data still resolves), then to the current directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from icp.core import config as cfglib
from icp.core import sweep as sweeplib
from icp.core.checkpointing import checkpoint_problem, resumable_checkpoint
from icp.core.errors import ConfigError, IcpError, WeightsError

CONFIG = "config.yaml"
STAGES = "stages.json"
# The main job's stage whose model is "the" model of the run (generate, eval, export).
MODEL_STAGE = "adaptation"
EXPECTED = ("a run directory (made by `icp fit` or `icp run`: config.yaml with checkpoints/, or stages.json), "
            "a checkpoint (.ckpt) in its checkpoints/, or a metrics.json")


@dataclass(frozen=True)
class RunInfo:
    """What a verb needs of a run; every path absent from the run is None."""

    kind: str                  # "fit" | "main" | "claims" (a fit of a claims study) | "metrics" (a lone record)
    root: Path                 # the directory the user means: the fit run or the main job's root
    checkpoint: Path | None    # the checkpoint to generate with (newest intact, or the one given)
    config: Path | None        # the config.yaml that builds that model (main job: its adaptation stage's)
    metrics: Path | None       # the run's metrics.json (``icp eval``'s eval/ first, else the main job's evaluate/)
    heldout: Path | None       # held-out shard folder (identities never trained on)
    embedder: Path | None      # the identity embedder.pt trained for this run's data
    model_run: Path | None = None   # the fit run holding ``config`` and ``checkpoints/``
    resolution: int | None = None   # data.resolution of the model
    main_config: Path | None = None  # main job: its own config.yaml (data, evaluate sections)
    checkpoint_problem: str | None = None  # why ``checkpoint`` is None, when it is

    def need_checkpoint(self) -> Path:
        """The checkpoint, or a one-line error saying why there is none."""
        if self.checkpoint is None:
            why = self.checkpoint_problem or f"{self.model_run or self.root} has no checkpoint under checkpoints/"
            raise WeightsError(f"{why}; train it first (`icp fit CONFIG` or `icp run CONFIG`), or pass a .ckpt file")
        return self.checkpoint


def _read_yaml(path: Path) -> dict:
    data = cfglib.safe_yaml(path.read_text(errors="replace"), str(path)) if path.is_file() else None
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _select(data: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _anchor(run_dir: Path, cfg: dict) -> Path | None:
    """The folder the job ran in: ``run_dir`` minus ``<run.root>/<experiment>/<name>`` when the run's
    config names a relative root that ``run_dir`` ends with."""
    root = _select(cfg, "run.root")
    experiment = cfg.get("experiment") or "default"
    if not isinstance(root, str) or Path(root).is_absolute():
        return None
    rel = Path(root) / str(experiment) / run_dir.name
    here = run_dir.resolve()
    if len(here.parts) > len(rel.parts) and here.parts[-len(rel.parts):] == rel.parts:
        return Path(*here.parts[:-len(rel.parts)])
    return None


def _path(value, anchor: Path | None) -> Path | None:
    """A path stored in a run's files, found relative to where the job ran, else to the current folder."""
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    if path.is_absolute():
        return path
    for base in ([anchor] if anchor else []) + [Path.cwd()]:
        if (base / path).exists():
            return base / path
    return (anchor or Path.cwd()) / path


def anchor_stored_paths(run_dir: Path, cfg, keys=("model.appearance_from", "model.backbone.path")) -> None:
    """Rewrite, in a run's loaded config (a DictConfig), the relative paths under ``keys`` that do
    not exist from here but do from the folder the job ran in (a run loaded from another folder:
    ``icp generate --checkpoint ../proj/runs/quickstart/main``)."""
    from omegaconf import OmegaConf

    anchor = _anchor(Path(run_dir), OmegaConf.to_container(cfg, resolve=False))
    if anchor is None:
        return
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        found = _path(value, anchor)
        if found is not None and found.exists() and not Path(value).exists():
            OmegaConf.update(cfg, key, str(found), merge=False)


def _checkpoint(run_dir: Path) -> tuple[Path | None, str | None]:
    try:
        ckpt = resumable_checkpoint(run_dir / "checkpoints")
    except WeightsError as err:  # every checkpoint corrupt: metrics may still be read, generation may not
        return None, str(err)
    return ckpt, None if ckpt else f"{run_dir} has no checkpoint under checkpoints/"


def _metrics(root: Path) -> Path | None:
    return next((p for p in (root / "eval" / "metrics.json", root / "evaluate" / "metrics.json") if p.is_file()), None)


def _stage_dir(main: Path, stages: dict, stage: str) -> Path | None:
    """A stage's fit run inside the main job's root: the one stages.json names (by its folder name,
    so a moved root still resolves), else the newest ``stages/<stage>/*/config.yaml``."""
    named = _select(stages, f"{stage}.result.run_dir")
    if isinstance(named, str) and (main / "stages" / stage / Path(named).name / CONFIG).is_file():
        return main / "stages" / stage / Path(named).name
    found = sorted((p.parent for p in (main / "stages" / stage).glob(f"*/{CONFIG}")), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _main_root(path: Path) -> Path | None:
    """The main job root a stage run sits in (``<main>/stages/<stage>/<run>``), if any."""
    main = path.parent.parent.parent
    return main if path.parent.parent.name == "stages" and (main / STAGES).is_file() else None


def _fit(run_dir: Path, given_ckpt: Path | None = None) -> RunInfo:
    cfg = _read_yaml(run_dir / CONFIG)
    anchor = _anchor(run_dir, cfg)
    main = _main_root(run_dir)
    kind, embedder = "fit", _path(_select(cfg, "callbacks.eval.embedder"), anchor)
    if main is not None:
        embedder = embedder or _resolve_main(main).embedder
    elif run_dir.parent.parent.name == "fits":  # a claims study: <root>/fits/<experiment>/<run>
        kind = "claims"
        found = sorted(run_dir.parent.parent.glob("claims_embedder/*/embedder.pt"), key=lambda p: p.stat().st_mtime)
        embedder = embedder or (found[-1] if found else None)
    ckpt, problem = (given_ckpt, None) if given_ckpt else _checkpoint(run_dir)
    resolution = _select(cfg, "data.resolution")
    return RunInfo(kind=kind, root=run_dir, checkpoint=ckpt, config=run_dir / CONFIG, metrics=_metrics(run_dir),
                   heldout=_path(_select(cfg, "data.val_shards"), anchor), embedder=embedder, model_run=run_dir,
                   resolution=resolution if isinstance(resolution, int) else None, checkpoint_problem=problem)


def _resolve_main(root: Path) -> RunInfo:
    cfg = _read_yaml(root / CONFIG)
    anchor = _anchor(root, cfg)
    stages = _read_json(root / STAGES)
    data = _read_json(root / "stages" / "data.json")
    out = _select(cfg, "data.out")
    heldout = _path(data.get("heldout"), anchor) or (_path(out, anchor) / "heldout" if isinstance(out, str) else None)
    embedder_run = _stage_dir(root, stages, "embedder")
    model_run = _stage_dir(root, stages, MODEL_STAGE)
    if model_run is not None:
        ckpt, problem = _checkpoint(model_run)
    else:
        ckpt, problem = None, f"{root}: the main job has no {MODEL_STAGE} stage run yet (stages/{MODEL_STAGE}/)"
    resolution = _select(cfg, "data.resolution")
    return RunInfo(kind="main", root=root, checkpoint=ckpt, config=model_run / CONFIG if model_run else None,
                   metrics=_metrics(root), heldout=heldout,
                   embedder=embedder_run / "embedder.pt" if embedder_run else None, model_run=model_run,
                   resolution=resolution if isinstance(resolution, int) else None, main_config=root / CONFIG,
                   checkpoint_problem=problem)


def _is_main(path: Path) -> bool:
    return (path / STAGES).is_file() or ((path / CONFIG).is_file() and (path / "stages").is_dir())


@dataclass(frozen=True)
class SweepPoint:
    label: str       # the point's axis overrides, e.g. "model.optimizer.lr=1e-4 seed=1"
    run_dir: Path


def sweep_points(path: str | Path) -> list[SweepPoint] | None:
    """The points of the sweep ``path`` names (its folder or its sweep.json), or None when it is no
    sweep. A point's run is looked up beside ``sweeps/`` first (the manifest's paths are relative to
    the folder the sweep ran in), so a moved run root still resolves."""
    path = Path(path)
    manifest = path / sweeplib.MANIFEST if path.is_dir() else path
    if manifest.name != sweeplib.MANIFEST or not manifest.is_file():
        return None
    data = _read_json(manifest)
    points = data.get("points")
    if data.get("schema") != sweeplib.SCHEMA or not isinstance(points, list) or not all(
            isinstance(p, dict) and isinstance(p.get("run_dir"), str) and p["run_dir"] for p in points):
        raise ConfigError(f"{manifest}: not a sweep manifest of schema {sweeplib.SCHEMA} (points with run_dir); "
                          "run the sweep again with `icp fit CONFIG -m ...`")
    axes = data.get("axes") if isinstance(data.get("axes"), dict) else {}
    beside = manifest.parent.parent.parent  # <run.root>/<experiment>/
    out = []
    for point in points:
        given = Path(point["run_dir"])
        run_dir = beside / given.name if (beside / given.name).is_dir() else given
        overrides = [o for o in point.get("overrides") or [] if isinstance(o, str)]
        label = " ".join(o for o in overrides if o.partition("=")[0].lstrip("+") in axes)
        out.append(SweepPoint(label or run_dir.name, run_dir))
    return out


def resolve(path: str | Path) -> RunInfo:
    """The run ``path`` names (see the module docstring); one-line ConfigError when it names none."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such run directory or file; pass {EXPECTED}")
    points = sweep_points(path)
    if points is not None:
        raise ConfigError(f"{path} is a sweep of {len(points)} runs; `icp eval` and `icp leaderboard` take it whole, "
                          f"other verbs one of its runs (e.g. {points[0].run_dir if points else '<run dir>'})")
    try:
        if path.is_dir():
            if _is_main(path):
                return _resolve_main(path)
            if (path / CONFIG).is_file():
                return _fit(path)
            if (path / "fits").is_dir() and (path / "timeline.json").is_file():
                runs = sorted(str(p.parent.relative_to(path)) for p in path.glob(f"fits/*/*/{CONFIG}"))[:3]
                raise ConfigError(f"{path} is the root of a claims study, which holds many runs; pass one of them "
                                  f"(e.g. {', '.join(runs) or 'fits/<experiment>/<run>'})")
            inside = sorted({str(p.parent) for pattern in (f"*/{CONFIG}", f"*/*/{CONFIG}") for p in path.glob(pattern)})
            hint = f" (it holds runs: {', '.join(inside[:3])}{' ...' if len(inside) > 3 else ''})" if inside else ""
            raise ConfigError(f"{path} is not a run directory (no config.yaml or stages.json){hint}; pass {EXPECTED}")
        if path.suffix == ".ckpt":
            run_dir = path.parent.parent
            if path.parent.name != "checkpoints" or not (run_dir / CONFIG).is_file():
                raise ConfigError(f"{path}: a checkpoint must sit in a run's checkpoints/ beside its config.yaml "
                                  f"(as `icp fit` writes it); pass {EXPECTED}")
            problem = checkpoint_problem(path)
            info = _fit(run_dir, given_ckpt=None if problem else path)
            if problem:
                return replace(info, checkpoint=None, checkpoint_problem=f"{path}: {problem}")
            return info
        if path.suffix == ".json":
            run_dir = path.parent.parent
            if path.parent.name in ("eval", "evaluate") and (_is_main(run_dir) or (run_dir / CONFIG).is_file()):
                return replace(resolve(run_dir), metrics=path)
            return RunInfo(kind="metrics", root=path.parent, checkpoint=None, config=None, metrics=path,
                           heldout=None, embedder=None, checkpoint_problem=f"{path} is a lone metrics record")
    except IcpError:
        raise
    except (OSError, ValueError) as err:  # unreadable files in a copied run: one line, not a traceback
        raise ConfigError(f"{path}: cannot read the run ({type(err).__name__}: {err}); pass {EXPECTED}") from None
    raise ConfigError(f"{path} is not a run: pass {EXPECTED}")
