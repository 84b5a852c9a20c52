"""``icp run``: the main job, from nothing to a report, as cached stages.

Stages (each one skipped when its output is complete and up to date, so re-running resumes):

1. ``data``       render training and held-out synthetic identities into shards;
2. ``embedder``   train the identity embedder on the training identities (the synthetic identity
                  metric; a real recogniser cannot be trained on synthetic heads offline);
3. ``stitching``  Lighting-Aware Stitching (appearance net + generation UNet);
4. ``adaptation`` View-Consistent Adaptation (matching net), initialised from stitching;
5. ``evaluate``   generate held-out identities in new poses/lights, compare with baselines;
6. ``report``     report.html / report.md with grids, flows, relighting, curves and metrics.

Each training stage is an ordinary ``icp fit`` of an experiment config with overrides, run into
``<run_dir>/stages/<stage>/``, so it can be re-run or inspected on its own.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from icp.core import config as cfglib
from icp.core import rundir
from icp.core.paths import EXPERIMENTS
from icp.core.errors import ConfigError

STAGES = ("data", "embedder", "stitching", "adaptation", "evaluate", "report")


def resolve_device(cfg: DictConfig) -> str:
    device = str(OmegaConf.select(cfg, "device", default="auto"))
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, not {device!r}")
    return device


def shards_dirs(cfg: DictConfig) -> tuple[Path, Path]:
    out = Path(cfg.data.out)
    return out / "train", out / "heldout"


def stage_data(cfg: DictConfig, run_dir: Path) -> dict:
    from icp.data.shards.write import synth

    d = cfg.data
    train, heldout = shards_dirs(cfg)
    # Held-out identities are a disjoint index range of the same generator: never seen in training.
    synth(train, identities=d.identities, views=d.views, resolution=d.resolution, seed=d.seed,
          workers=d.workers, shard_size=d.shard_size)
    synth(heldout, identities=d.heldout_identities, views=d.views, resolution=d.resolution, seed=d.seed,
          workers=d.workers, shard_size=d.shard_size, first_identity=d.identities)
    return {"train": str(train), "heldout": str(heldout)}


def stage_config(cfg: DictConfig, name: str, run_dir: Path, placeholder: str | None = None) -> DictConfig:
    """The ``icp fit`` config a training stage runs: its experiment file plus the job's overrides.

    ``placeholder`` stands in for other stages' outputs that do not exist yet (dry runs, checks).
    """
    node = cfg[name]
    train, heldout = shards_dirs(cfg)
    accelerator = "gpu" if resolve_device(cfg) == "cuda" else "cpu"
    overrides = [
        # No run.name: the sub-run is named by its config hash, so a changed stage config
        # trains afresh instead of continuing a checkpoint made from other data or settings.
        f"run.root={run_dir / 'stages'}", f"experiment={name}", f"seed={cfg.seed}",
        f"data.shards={train}", f"data.val_shards={heldout}", f"data.resolution={cfg.data.resolution}",
        f"trainer.accelerator={accelerator}", "trainer.devices=1",
        *[_fill(o, run_dir, placeholder) for o in node.get("overrides", [])],
    ]
    return cfglib.load(EXPERIMENTS / node.config, overrides)


def check(cfg: DictConfig) -> None:
    """Validate every training stage's config (targets and keys) without building anything."""
    run_dir = rundir.run_dir_of(cfg)
    for name in ("embedder", "stitching", "adaptation"):
        if name in cfg:
            sub = stage_config(cfg, name, run_dir, placeholder="<from an earlier stage>")
            for node in ("data", "model", "trainer"):
                cfglib.validate(sub[node], sub, node)


def fit_stage(name: str) -> Callable[[DictConfig, Path], dict]:
    def stage(cfg: DictConfig, run_dir: Path) -> dict:
        from icp.jobs.fit import fit

        stage_dir = fit(stage_config(cfg, name, run_dir))
        return {"run_dir": str(stage_dir), "checkpoint": str(stage_dir / "checkpoints" / "last.ckpt")}

    return stage


def _fill(override: str, run_dir: Path, placeholder: str | None = None) -> str:
    """Overrides may name another stage's outputs as {stitching.run_dir}, {stitching.checkpoint}."""
    state_file = run_dir / "stages.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    for stage, entry in state.items():
        for key, value in entry.get("result", {}).items():
            override = override.replace("{" + f"{stage}.{key}" + "}", str(value))
    if placeholder is not None:
        override = re.sub(r"\{\w+\.\w+\}", placeholder, override)
    if re.search(r"\{\w+\.\w+\}", override):
        raise ConfigError(f"override '{override}' refers to a stage output that does not exist yet")
    return override


def stage_evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    from icp.jobs.evaluate import evaluate

    return evaluate(cfg, run_dir, device=resolve_device(cfg))


def stage_report(cfg: DictConfig, run_dir: Path) -> dict:
    from icp.jobs.report import write_report

    paths = write_report(run_dir)
    return {k: str(v) for k, v in paths.items()}


STAGE_FUNCS: dict[str, Callable[[DictConfig, Path], dict]] = {
    "data": stage_data,
    "embedder": fit_stage("embedder"),
    "stitching": fit_stage("stitching"),
    "adaptation": fit_stage("adaptation"),
    "evaluate": stage_evaluate,
    "report": stage_report,
}


def stage_key(cfg: DictConfig, stage: str) -> str:
    """What a stage's result depends on: its own node, the data, and every earlier stage."""
    upto = STAGES[: STAGES.index(stage) + 1]
    data = {s: OmegaConf.to_container(cfg[s], resolve=True) for s in upto if s in cfg}
    data["seed"] = cfg.seed
    return json.dumps(data, sort_keys=True, default=str)


def run(cfg: DictConfig, only: list[str] | None = None) -> Path:
    run_dir = rundir.prepare(cfg)
    state_file = run_dir / "stages.json"
    state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.is_file() else {}
    selected = [s for s in STAGES if s in cfg and (not only or s in only)]
    for i, stage in enumerate(selected, 1):
        key = stage_key(cfg, stage)
        done = state.get(stage)
        if done and done.get("key") == key and not only:
            print(f"icp run [{i}/{len(selected)}] {stage}: up to date, skipped")
            continue
        print(f"icp run [{i}/{len(selected)}] {stage} ...", flush=True)
        start = time.time()
        result = STAGE_FUNCS[stage](cfg, run_dir)
        state[stage] = {"key": key, "seconds": round(time.time() - start, 1), "result": result}
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_file)
        print(f"icp run [{i}/{len(selected)}] {stage}: done in {state[stage]['seconds']:.0f} s", flush=True)
    return run_dir
