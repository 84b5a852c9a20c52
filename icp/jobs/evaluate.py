"""The main job's evaluate step: the paired evaluation of held-out identities, flows, relighting.

Everything is measured on identities never seen in training (a disjoint index range of the
generator), through the one paired evaluation (icp.eval.paired): the method beside the
other-identity profile (same model, masked targets and noise; the profile is always another
identity's), the copied and mirrored profile, model-free inpainting of the masked target and the
true render (the ceiling). Intervals are bootstrapped over identities.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from icp.data import keys as K
from icp.eval import baselines as B
from icp.eval import metrics as M
from icp.eval import relighting as RL
from icp.eval.evaluator import LOWER_IS_BETTER, MEANINGS, build_extractors
from icp.eval.grids import save_grid
from icp.eval.heldout import heldout_loader, interleaved, take
from icp.eval.paired import METHOD, evaluate_pairs
from icp.eval.stats import fmt_interval
from icp.jobs.runner import Job, shards_dirs

FLOW_MEANINGS = {
    "flow_epe": "matching-flow end-point error in pixels vs the renderer's ground truth (lower is better)",
    "flow_pck": "fraction of co-visible target pixels whose matched profile pixel is within 5% of the image size",
    "flow_epe_zero": "end-point error of the zero (no-motion) flow: the baseline a useful matcher must beat",
}
DEFAULT_BASELINES = ("other_identity", "copy_profile", "mirror_profile", "inpaint", "truth")


def evaluate(cfg: DictConfig, run_dir: Path, jobs: dict[str, Job], device: str = "cpu") -> dict:
    from icp.tasks.loading import load_task

    ev = cfg.evaluate
    out_dir = run_dir / "evaluate"
    out_dir.mkdir(parents=True, exist_ok=True)
    task = load_task(jobs["adaptation"].run_dir, device=device)
    probe = str(jobs["probe"].run_dir / "probe.pt") if "probe" in jobs else None
    extractors = build_extractors(identity=tuple(ev.identity), embedder=str(jobs["embedder"].run_dir / "embedder.pt"),
                                  fid=bool(ev.fid), device=device, probe=probe,
                                  dlib_landmarks=bool(ev.get("dlib_landmarks", "dlib" in ev.identity)))
    baselines = B.resolve(list(OmegaConf.select(cfg, "evaluate.baselines", default=None) or DEFAULT_BASELINES))
    loader = heldout_loader(str(shards_dirs(cfg)[1]), resolution=cfg.data.resolution, mask_ratio=ev.mask_ratio,
                            patch_size=ev.patch_size, pairs_per_identity=ev.pairs_per_identity, seed=cfg.seed,
                            batch_size=ev.batch_size)
    bar = tqdm(total=-(-int(ev.pairs) // int(ev.batch_size)), desc="evaluate", unit="batch")
    result = evaluate_pairs(task.sample, interleaved(loader, int(ev.pairs), int(ev.batch_size)), extractors, device, baselines=baselines,
                            num_steps=int(ev.steps), seed=int(cfg.seed), grid_samples=6, progress=bar)
    bar.close()
    save_grid(out_dir / "grid.png", result.grid_columns, row_labels=[f"id {i}" for i in result.grid_identities])
    flows = flow_scores(task, cfg, out_dir, device)
    relight = relighting(task, cfg, out_dir, device)
    found = summarise(result, extractors, flows, relight)
    found["reliability"] = reliability(extractors, cfg)
    if extractors.probe is not None:
        found["reliability"]["markdown"] = (found["reliability"].get("markdown", "") + "\n"
                                            + probe_floor(extractors.probe, cfg, str(shards_dirs(cfg)[1])) + "\n")
    return found


def probe_floor(probe, cfg: DictConfig, heldout: str) -> str:
    """The geometry probe's own error on held-out TRUE targets: what its view-consistency figures resolve."""
    from icp.eval.geometry import probe_reliability, reliability_line

    ev = cfg.evaluate
    loader = heldout_loader(heldout, resolution=cfg.data.resolution, mask_ratio=ev.mask_ratio, patch_size=ev.patch_size,
                            pairs_per_identity=ev.pairs_per_identity, seed=cfg.seed, batch_size=ev.batch_size)
    with torch.no_grad():
        return reliability_line(probe_reliability(probe, take(loader, int(ev.pairs)), role="target"))


def reliability(extractors, cfg: DictConfig) -> dict:
    """How far the synthetic-identity metric can be trusted: verification of held-out identities by yaw
    difference and its drop under blur (icp.eval.reliability), on the held-out identities' renders."""
    from icp.eval.reliability import heldout_views, reliability_markdown, reliability_report

    if "icp" not in extractors.identity:
        return {}
    d = cfg.data
    views = heldout_views(int(d.identities), int(d.heldout_identities), int(d.views), int(d.resolution), int(d.seed))
    found = reliability_report(extractors.identity["icp"], views)
    found["markdown"] = reliability_markdown(found)
    return found


def flow_scores(task, cfg: DictConfig, out_dir: Path, device: str) -> dict:
    """Matching-flow error against the renderer's flow, beside the zero flow (adaptation only)."""
    if not hasattr(task, "predict_flow"):
        return {}
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from torchvision.utils import save_image

    from icp.tasks.flows import flow_metrics, flow_picture

    ev = cfg.evaluate
    loader = heldout_loader(str(shards_dirs(cfg)[1]), resolution=cfg.data.resolution, mask_ratio=ev.mask_ratio,
                            patch_size=ev.patch_size, pairs_per_identity=ev.pairs_per_identity, seed=cfg.seed,
                            batch_size=ev.batch_size)
    avg = M.Averages(list(FLOW_MEANINGS))
    for i, batch in enumerate(take(loader, int(ev.pairs))):
        batch = move_data_to_device(batch, device)
        if K.FLOW_GT not in batch:
            return {}
        with torch.no_grad():
            flows = task.predict_flow(batch)
        found = flow_metrics(flows, task.match_levels, batch, task.pck_alpha)
        avg.update({k: found[k].reshape(1) for k in FLOW_MEANINGS})
        if i == 0:
            picture = flow_picture(flows, task.match_levels, batch, count=6)[None]
            scale = max(1, 96 // batch[K.TARGET].shape[-1])
            save_image(torch.nn.functional.interpolate(picture, scale_factor=scale, mode="nearest"), out_dir / "flows.png")
    return {k: float(v) for k, v in avg.compute().items()}


def relighting(task, cfg: DictConfig, out_dir: Path, device: str) -> dict:
    """The first held-out identities in one pose under several lights (icp.eval.relighting)."""
    ev, d = cfg.evaluate, cfg.data
    s = RL.relight_set(int(d.identities), min(int(ev.get("relight_identities", 4)), int(d.heldout_identities)),
                       int(ev.relight_lights), int(d.resolution), int(d.seed), int(cfg.seed), float(ev.mask_ratio),
                       int(ev.patch_size))
    out = RL.generate(task.sample, s, int(ev.steps), device, int(cfg.seed))
    cols, labels = RL.grid_columns(out, s, n_show=1)
    save_grid(out_dir / "relight.png", cols, row_labels=labels)
    found = {}
    for name, images in (("method", out), ("inpaint", RL.inpainted(s))):
        rows = RL.scores(images, s)
        found[name] = {k: sum(r[k] for r in rows) / len(rows) for k in RL.KEYS}
    return found


def summarise(result, extractors, flows: dict, relight: dict) -> dict:
    described = extractors.describe()
    arms = list(result.scalars)
    rows = []
    for name in sorted(set().union(*(result.scalars[a] for a in arms)) | set(flows)):
        row = {"name": name, "value": result.scalars[METHOD].get(name, flows.get(name)),
               # per-pair metrics carry an identity-bootstrap interval; set-level ones (FID, KID) and flows do not
               "interval": fmt_interval(result.intervals[METHOD][name]) if name in result.intervals[METHOD] else None,
               "extractor": extractor_of(name, described), "meaning": MEANINGS.get(name, FLOW_MEANINGS.get(name, "")),
               "lower_is_better": name in LOWER_IS_BETTER, "baselines": {}, "versus": {}}
        for arm in arms[1:]:
            row["baselines"][arm] = result.scalars[arm].get(name)
            if name in result.comparisons.get(arm, {}):
                row["versus"][arm] = result.comparisons[arm][name]
        if name == "flow_epe" and "flow_epe_zero" in flows:
            row["baselines"]["zero_flow"] = flows["flow_epe_zero"]
        rows.append(row)
    for name, why in extractors.unavailable.items():
        rows.append({"name": name, "value": None, "unavailable": why, "meaning": why})
    summary = identity_verdict(result)
    if "flow_epe" in flows and "flow_epe_zero" in flows:
        learned = flows["flow_epe"] < flows["flow_epe_zero"]
        summary += (f" Matching: flow EPE {flows['flow_epe']:.2f} px vs {flows['flow_epe_zero']:.2f} px for the "
                    f"zero flow, so the Matching Net {'has' if learned else 'has NOT yet'} learned useful "
                    "correspondence at this scale.")
    m, i = relight["method"], relight["inpaint"]
    notes = [f"relighting: the output follows its own target's light by {m['follow_shading']:+.4f} (shading) and "
             f"{m['follow_colour']:+.4f} (colour); model-free inpainting of the masked target scores "
             f"{i['follow_shading']:+.4f} / {i['follow_colour']:+.4f} (positive = closer to its own light than "
             "to the other lights)",
             "baselines: the same model, masked targets and noise with each profile swapped for another held-out "
             "identity's (never the same identity); the profile copied and mirrored; model-free inpainting of the "
             "masked target; the true render (the ceiling)",
             "intervals: 95 % bootstrap over identities (pairs of one identity are resampled together); a "
             "comparison with fewer than 20 valid pairs is never called better or worse"]
    return {"summary": summary, "metrics": rows, "arms": arms, "extractors": described, "relighting": relight,
            "flows": flows, "samples": result.samples, "notes": notes,
            "per_pair": {arm: rs for arm, rs in result.rows.items()}}


def extractor_of(metric: str, described: dict) -> str:
    """Which model produced a metric's features (every report names it)."""
    def named(entry: dict) -> str:
        sha = entry.get("sha256")
        return (entry.get("label") or entry.get("name", "?")) + (f" (weights sha256 {sha[:12]})" if sha else "")

    for prefix in ("id_cos_", "face_fail_"):
        if metric.startswith(prefix):
            return named(described.get("identity_" + metric[len(prefix):], {}))
    if metric in ("fid", "kid"):
        return named(described.get("inception", {}))
    if metric.startswith("clip_"):
        return named(described.get("clip", {}))
    if metric in ("landmark_err", "yaw_err", "pitch_err", "silhouette_iou") and "probe" in described:
        return named(described["probe"])
    if metric in ("landmark_err_dlib", "lm_fail_dlib") and "landmarks_dlib" in described:
        return named(described["landmarks_dlib"])
    return "renderer ground truth"


def identity_verdict(result) -> str:
    method = result.scalars[METHOD]
    key = "id_cos_icp" if "id_cos_icp" in method else next((k for k in method if k.startswith("id_cos_")), None)
    if key is None:
        return "No identity extractor was available, so identity preservation was not measured."
    text = f"Identity: generated portraits of held-out identities have {key} = {fmt_interval(result.intervals[METHOD][key])}."
    versus = result.comparisons.get("other_identity", {}).get(key)
    if versus:
        base = result.intervals["other_identity"][key]
        said = {"better": "beats", "worse": "is WORSE than", "no difference": "does NOT beat",
                "too few": "cannot be compared with (too few valid pairs)"}[versus["verdict"]]
        text += (f" icp {said} the other-identity baseline ({base['mean']:.3f}): paired difference "
                 f"{fmt_interval(versus)}, icp closer in {versus['win_rate']:.0%} of pairs.")
    if "truth" in result.intervals:
        text += f" The true render scores {result.intervals['truth'][key]['mean']:.3f} (the ceiling)."
    return text
