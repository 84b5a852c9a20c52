"""The jobs of ``eval/paper_claims.py``: every sub-fit and evaluation, their run dirs and order.

A job is a named unit with dependencies: a *fit* (an ordinary ``icp fit`` of an experiment file
with overrides, run by ``icp.jobs.fit.fit`` into ``<root>/fits/<experiment>/cfg-<hash>/``) or an
*evaluation* (``claims.measure``, writing ``<root>/evals/<name>.json``). Every path follows from
the config alone -- a fit's run directory is the hash of its resolved config, and a later fit names
an earlier one's directory (the pretrained backbone folder, the stitching run) before it exists --
so the whole plan is known up front, a sub-process can rebuild it to run one job, and a re-run
skips every job whose output is complete.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from icp.jobs import runner
from icp.jobs.runner import Job, shards_dirs


def ratio_tag(ratio: float) -> str:
    return f"m{round(float(ratio) * 100):03d}"


def fit_config(cfg: DictConfig, node: str, experiment: str, extra: list[str]) -> DictConfig:
    """The fit config of one variant: its experiment file + the shared and the variant's overrides."""
    fit = cfg.fits[node]
    overrides = ["logger.wandb=null", *[str(o) for o in fit.get("overrides", [])], *extra]
    return runner.fit_config(cfg, Path(cfg.root) / "fits", experiment, fit.config, overrides)


def _backbone(pretrain_dir: Path) -> list[str]:
    # Two overrides: a merge would keep the tiny builder's keys, which pretrained() does not take.
    return ["model.backbone=null",
            "model.backbone={_target_: icp.models.backbone.pretrained, path: " + str(pretrain_dir / "backbone") + "}"]


def given_base(cfg: DictConfig) -> Path | None:
    """``fits.pretrain.backbone``: an exported base (a diffusers folder named ``backbone`` holding
    ``unet/``) used instead of a pretrain fit; None when the study pretrains its own."""
    path = OmegaConf.select(cfg, "fits.pretrain.backbone", default=None)
    if path is None:
        return None
    path = Path(str(path))
    if path.name != "backbone" or not (path / "unet" / "config.json").is_file():
        from icp.core.errors import ConfigError

        raise ConfigError(f"fits.pretrain.backbone={path}: not an exported base (a folder named 'backbone' with "
                          "unet/config.json, as a pretrain run writes); point it at <pretrain run>/backbone")
    return path


def build(cfg: DictConfig) -> dict[str, Job]:
    jobs: dict[str, Job] = {}

    def add(job: Job) -> Job:
        jobs[job.name] = job
        return job

    claims = cfg.claims
    embedder = add(Job("embedder", "fit", needs=("embedder.pt",),
                       cfg=fit_config(cfg, "embedder", "claims_embedder", [])))
    probe = None
    if "probe" in cfg.fits:  # the geometry probe: view-consistency metrics for the warping claim
        probe = add(Job("probe", "fit", needs=("probe.pt",), cfg=fit_config(cfg, "probe", "claims_probe", [])))
    given = given_base(cfg)
    if given is None:
        pretrain = add(Job("pretrain", "fit", needs=("backbone/unet",), cost=3,
                           cfg=fit_config(cfg, "pretrain", "claims_pretrain", [])))
        base_dir, base_deps = pretrain.run_dir, ["pretrain"]
    else:  # a base trained elsewhere (e.g. by an earlier GPU call): every variant starts from it
        base_dir, base_deps = given.parent, []
    stitch: dict[float, Job] = {}
    for ratio in claims.masking.ratios:
        extra = [*_backbone(base_dir), f"data.mask_ratio={float(ratio)}"]
        stitch[float(ratio)] = add(Job(f"stitch_{ratio_tag(ratio)}", "fit", deps=base_deps, cost=4,
                                       cfg=fit_config(cfg, "stitching", "claims_stitching", extra)))
    main = stitch.get(float(claims.masking.main_ratio))
    if main is None:
        from icp.core.errors import ConfigError

        raise ConfigError(f"claims.masking.main_ratio={claims.masking.main_ratio} must be one of claims.masking.ratios")
    heldout = shards_dirs(cfg)[1]
    fl = claims.fast_learner
    curve = ("+callbacks.flow_curve={_target_: icp.tasks.flows.FlowCurve, shards: " + str(heldout)
             + f", steps: {list(fl.steps)}, pairs: {fl.pairs}, pairs_per_identity: {fl.pairs_per_identity}, "
             + f"resolution: {cfg.data.resolution}, mask_ratio: {float(claims.masking.main_ratio)}, "
             + f"patch_size: {cfg.evaluate.patch_size}, seed: {cfg.seed}}}")
    base_adapt = [*_backbone(base_dir), f"model.appearance_from={main.run_dir}",
                  f"data.mask_ratio={float(claims.masking.main_ratio)}"]
    variants = {"adapt_base": ["+model.matching_init=base", curve],
                "adapt_random": ["+model.matching_init=random", curve],
                "adapt_nowarp": ["+model.matching_init=base", "model.warp_identity=false"]}
    weight = float(fl.get("supervised_weight", 0.0))
    if weight > 0:  # a reference, not the paper's method: what the same Matching Net reaches with the true flow
        variants["adapt_flowsup"] = ["+model.matching_init=base", f"model.aux_flow_weight={weight}", curve]
    oracle = bool(claims.warping.get("true_flow", False))
    if oracle:  # the warp with the renderer's flow: what warping is worth when the matching is right
        variants["adapt_truewarp"] = ["+model.matching_init=base", "+model.flow_source=ground_truth"]
    for name, extra in variants.items():
        add(Job(name, "fit", deps=[main.name], cost=4,
                cfg=fit_config(cfg, "adaptation", "claims_adaptation", base_adapt + extra)))
    emb = str(embedder.run_dir / "embedder.pt")
    probe_pt = str(probe.run_dir / "probe.pt") if probe else None
    scorers = ["embedder", "probe"] if probe else ["embedder"]
    for ratio, job in stitch.items():
        add(Job(f"eval_masking_{ratio_tag(ratio)}", "step", deps=[job.name, *scorers], cost=0.5,
                spec={"claim": "masking", "run": str(job.run_dir), "embedder": emb, "probe": probe_pt, "mask_ratio": ratio}))
    warp_evals = [("warp", "adapt_base"), ("nowarp", "adapt_nowarp")] + ([("truewarp", "adapt_truewarp")] if oracle else [])
    for name, run in warp_evals:
        add(Job(f"eval_warping_{name}", "step", deps=[run, *scorers], cost=0.8,
                spec={"claim": "warping", "run": str(jobs[run].run_dir), "embedder": emb, "probe": probe_pt,
                      "mask_ratio": float(claims.masking.main_ratio)}))
    add(Job("eval_relighting", "step", deps=["adapt_base", main.name, "embedder"], cost=0.6,
            spec={"claim": "relighting", "runs": {"adaptation": str(jobs["adapt_base"].run_dir),
                                                  "stitching": str(main.run_dir)},
                  "embedder": emb, "mask_ratio": float(claims.masking.main_ratio)}))
    for job in jobs.values():
        if job.kind == "step":
            job.key, job.result = eval_key(cfg, job), eval_path(cfg, job)
    return jobs


# Claim settings that only decide whether a reference job exists (so toggling one keeps the cache)
PLAN_ONLY = {"warping": ("true_flow",), "fast_learner": ("supervised_weight",)}


def eval_key(cfg: DictConfig, job: Job) -> str:
    """What an evaluation's result depends on: its spec, the evaluation settings, the data, the seed."""
    claim = OmegaConf.to_container(cfg.claims[job.spec["claim"]], resolve=True)
    for key in PLAN_ONLY.get(job.spec["claim"], ()):  # they add jobs, they do not change this one
        claim.pop(key, None)
    data = {"spec": job.spec, "evaluate": OmegaConf.to_container(cfg.evaluate, resolve=True), "claim": claim,
            "data": OmegaConf.to_container(cfg.data, resolve=True), "seed": int(cfg.seed)}
    return runner.digest(data)


def eval_path(cfg: DictConfig, job: Job) -> Path:
    return Path(cfg.root) / "evals" / f"{job.name}.json"


