"""``icp run``: the main job, from nothing to a report, as cached jobs of the shared runner.

Jobs (each skipped when its output is complete and up to date, so re-running resumes):

1. ``data``       render training and held-out synthetic identities into shards;
2. ``embedder``   train the identity embedder on the training identities (the synthetic identity
                  metric; a real recogniser cannot be trained on synthetic heads offline);
3. ``probe``      train the geometry probe (silhouette, landmarks, yaw/pitch) that the
                  view-consistency metrics read outputs with (optional);
4. ``pretrain``   pretrain the base diffusion model the control nets are copied from (optional;
                  later stages name it as ``{pretrain.run_dir}/backbone``);
5. ``stitching``  Lighting-Aware Stitching (appearance net + generation UNet);
6. ``adaptation`` View-Consistent Adaptation (matching net), initialised from stitching;
7. ``evaluate``   the paired evaluation of held-out identities (icp.jobs.evaluate);
8. ``report``     report.html / report.md with grids, flows, relighting, curves and metrics.

Each training job is an ordinary ``icp fit`` of an experiment config with overrides, run into
``<run_dir>/stages/<stage>/cfg-<hash>/``, so it can be re-run or inspected on its own. An
override may name an earlier fit's outputs as ``{stitching.run_dir}`` / ``{stitching.checkpoint}``:
the plan knows every run directory before anything runs (icp.jobs.runner).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from icp.core import config as cfglib
from icp.core import rundir
from icp.core.errors import ConfigError
from icp.jobs import runner, wandb_log
from icp.jobs.runner import Job, digest

STAGES = ("data", "embedder", "probe", "pretrain", "correspondence", "stitching", "adaptation", "evaluate",
          "report")
FITS = ("embedder", "probe", "pretrain", "stitching", "adaptation")
# What a fit must have written for the jobs after it (the runner's cache rule checks these too).
NEEDS = {"embedder": ("embedder.pt",), "probe": ("probe.pt",), "pretrain": ("backbone/unet",)}


def _fill(override: str, jobs: dict[str, Job]) -> str:
    def value(m: re.Match) -> str:
        stage, key = m.group(1), m.group(2)
        if stage not in jobs or jobs[stage].kind != "fit" or key not in ("run_dir", "checkpoint"):
            raise ConfigError(f"override '{override}' refers to {{{stage}.{key}}}, which no earlier stage provides "
                              "(use {stage.run_dir} or {stage.checkpoint} of embedder, stitching or adaptation)")
        run = jobs[stage].run_dir
        return str(run if key == "run_dir" else run / "checkpoints" / "last.ckpt")

    return re.sub(r"\{(\w+)\.(\w+)\}", value, override)


def plan(cfg: DictConfig) -> dict[str, Job]:
    run_dir = rundir.run_dir_of(cfg)
    jobs: dict[str, Job] = {}
    if "data" in cfg:
        jobs["data"] = Job("data", "step", key=digest(OmegaConf.to_container(cfg.data, resolve=True)),
                           result=run_dir / "stages" / "data.json")
    for name in FITS:
        if name not in cfg:
            continue
        node = cfg[name]
        raw = [str(o) for o in node.get("overrides", [])]
        overrides = [_fill(o, jobs) for o in raw]
        named = {m for o in raw for m in re.findall(r"\{(\w+)\.\w+\}", o)}  # earlier fits it reads
        deps = [d for d in jobs if d == "data" or d in named]
        fit = runner.fit_config(cfg, run_dir / "stages", name, node.config, overrides)
        jobs[name] = Job(name, "fit", deps=deps, needs=NEEDS.get(name, ()), cfg=wandb_log.stage_config(fit, cfg, name))
        if name == "pretrain" and "correspondence" in cfg:  # the base's DIFT-style probe, before any adaptation
            jobs["correspondence"] = Job(
                "correspondence", "step", deps=["pretrain"], result=run_dir / "stages" / "correspondence.json",
                key=digest({"correspondence": OmegaConf.to_container(cfg.correspondence, resolve=True),
                            "data": OmegaConf.to_container(cfg.data, resolve=True),
                            "backbone": str(jobs["pretrain"].run_dir), "seed": cfg.seed}))
    if "correspondence" in cfg and "correspondence" not in jobs:
        raise ConfigError("the correspondence stage probes the pretrain stage's backbone: add a pretrain node")
    fits = {n: str(j.run_dir) for n, j in jobs.items() if j.kind == "fit"}
    if "evaluate" in cfg:
        evaluate = OmegaConf.to_container(cfg.evaluate, resolve=True)
        jobs["evaluate"] = Job("evaluate", "step", deps=[n for n in FITS if n in jobs] + (["data"] if "data" in jobs else []),
                               key=digest({"evaluate": evaluate, "data": jobs["data"].key if "data" in jobs else None,
                                           "fits": fits, "seed": cfg.seed}),
                               result=run_dir / "evaluate" / "metrics.json")
    if "report" in cfg:
        jobs["report"] = Job("report", "step", deps=[n for n in jobs],
                             key=digest({"report": OmegaConf.to_container(cfg.report, resolve=True),
                                         "evaluate": jobs["evaluate"].key if "evaluate" in jobs else None,
                                         "fits": fits}),
                             result=run_dir / "report.json")
    return jobs


def check(cfg: DictConfig) -> None:
    """Validate every training stage's config (targets and keys) without building anything."""
    jobs = plan(cfg)
    wandb_settings(cfg, jobs)
    for job in jobs.values():
        if job.kind == "fit":
            for node in ("data", "model", "trainer"):
                cfglib.validate(job.cfg[node], job.cfg, node)


def wandb_settings(cfg: DictConfig, jobs: dict[str, Job]) -> dict | None:
    """The evaluate / report W&B settings (None: off); refuses online logging without an API key."""
    fits = [j.cfg for j in jobs.values() if j.kind == "fit"]
    opts = wandb_log.settings(cfg, fits)
    wandb_log.check_online(wandb_log.fit_modes(fits) + ([opts["mode"]] if opts else []))
    return opts


def execute(cfg: DictConfig, run_dir: Path, jobs: dict[str, Job], job: Job) -> None:
    device = runner.resolve_device(cfg)
    if job.kind == "fit":
        from icp.jobs.fit import fit

        fit(job.cfg)
        if not runner.is_done(job):
            raise ConfigError(f"stage {job.name} ended without reaching trainer.max_steps ({job.run_dir})")
    elif job.name == "data":
        runner.write_result(job, runner.render_data(cfg))
    elif job.name == "correspondence":
        from icp.eval.correspondence import from_pipeline

        backbone = jobs["pretrain"].run_dir / "backbone"
        runner.write_result(job, from_pipeline(cfg, backbone, run_dir / "correspondence", device))
    elif job.name == "evaluate":
        from icp.jobs.evaluate import evaluate

        runner.write_result(job, evaluate(cfg, run_dir, jobs, device=device))
        wandb_log.log_evaluate(wandb_settings(cfg, jobs), run_dir, job.result)
    elif job.name == "report":
        from icp.jobs.report import PICTURES, write_report

        runner.write_result(job, {k: str(v) for k, v in write_report(run_dir).items()})
        wandb_log.log_report(wandb_settings(cfg, jobs), run_dir,
                             [(run_dir / "evaluate" / name, caption) for name, caption in PICTURES])


def run(cfg: DictConfig, only: list[str] | None = None, until: str | None = None) -> Path:
    """Run the job; ``only`` forces those stages, ``until`` stops after that stage (the rest wait for a
    later invocation: a GPU call of limited length can end after the base and its probe)."""
    jobs = plan(cfg)
    wandb_settings(cfg, jobs)  # online without an API key: refused before anything is made
    run_dir = rundir.prepare(cfg)
    if until:
        jobs = {n: j for n, j in jobs.items() if STAGES.index(n) <= STAGES.index(until)}
    state_file = run_dir / "stages.json"
    timeline = runner.Timeline(run_dir / "timeline.json")

    def save_state() -> None:
        # What the report reads: each stage's run directory and how long it took.
        history = timeline.history()
        state = {name: {"seconds": history.get(name, {}).get("seconds"),
                        "result": {"run_dir": str(job.run_dir)} if job.kind == "fit" else {"file": str(job.result)}}
                 for name, job in jobs.items()}
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_file)

    runner.run(jobs, execute=lambda job: execute(cfg, run_dir, jobs, job), timeline=timeline,
               on_change=save_state, force=tuple(only or ()), prefix="icp run", raise_errors=True)
    timeline.finish()
    save_state()
    return run_dir
