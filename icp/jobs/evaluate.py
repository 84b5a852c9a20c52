"""The main job's evaluation stage: held-out identities, a baseline, relighting, pictures.

Everything is measured on identities never seen in training (a disjoint index range of the
generator). The identity question is answered against a baseline that keeps everything but the
identity: the same model, the same masked targets, the same noise, but each profile replaced by
another held-out identity's profile. If generation uses the profile, its output must be closer
(in the identity embedder's space) to the true profile than the baseline's output is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from icp.data import keys as K
from icp.eval import metrics as M
from icp.eval.evaluator import Evaluator, build_extractors
from icp.eval.heldout import heldout_loader, take
from icp.jobs.stages import shards_dirs
from icp.tasks.loading import load_task

MEANINGS = {
    "id_cos_icp": "cosine similarity of output and profile in the icp synthetic-identity embedder (higher = same person)",
    "id_cos_dlib": "cosine similarity of output and profile, dlib 128-D face descriptor (real recogniser)",
    "face_fail_dlib": "fraction of outputs in which dlib's detector found no face",
    "psnr": "PSNR (dB) of output vs the true render of the profile identity in the target pose and light",
    "psnr_fg": "PSNR (dB) on the head only (target foreground mask)",
    "ssim": "SSIM of output vs the true render",
    "light_colour_err": "error of the mean head colour vs the true render (lighting colour)",
    "shading_err": "error of the head's shading statistics vs the true render (lighting direction)",
    "fid": "FID of outputs vs true renders (TF-FID Inception; few samples: compare runs, not papers)",
    "kid": "KID of outputs vs true renders (TF-FID Inception)",
    "flow_epe": "matching-flow end-point error in pixels vs the renderer's ground truth (lower is better)",
    "flow_pck": "fraction of co-visible target pixels whose matched profile pixel is within 5% of the image size",
    "flow_epe_zero": "end-point error of the zero (no-motion) flow: the baseline a useful matcher must beat",
}
FLOW_KEYS = ("flow_epe", "flow_pck", "flow_epe_zero")
LOWER_IS_BETTER = {"psnr": False, "psnr_fg": False, "ssim": False, "face_fail_dlib": True,
                   "light_colour_err": True, "shading_err": True, "fid": True, "kid": True, "flow_epe": True, "flow_epe_zero": True}


def other_identity(batch: dict) -> dict:
    """The same batch with every profile taken from the next sample (another identity)."""
    swapped = dict(batch)
    swapped[K.PROFILE] = batch[K.PROFILE].roll(1, dims=0)
    return swapped


def evaluate(cfg: DictConfig, run_dir: Path, device: str = "cpu") -> dict:
    ev = cfg.evaluate
    state = json.loads((run_dir / "stages.json").read_text())
    out_dir = run_dir / "evaluate"
    out_dir.mkdir(exist_ok=True)
    task = load_task(state["adaptation"]["result"]["run_dir"], device=device)
    embedder = Path(state["embedder"]["result"]["run_dir"]) / "embedder.pt"
    extractors = build_extractors(identity=tuple(ev.identity), embedder=str(embedder), fid=bool(ev.fid), device=device)
    model_eval, base_eval = Evaluator(extractors).to(device), Evaluator(extractors).to(device)
    heldout = str(shards_dirs(cfg)[1])
    loader = heldout_loader(heldout, resolution=cfg.data.resolution, mask_ratio=ev.mask_ratio, patch_size=ev.patch_size,
                            pairs_per_identity=ev.pairs_per_identity, seed=cfg.seed, batch_size=ev.batch_size)
    flow_avg = M.Averages(list(FLOW_KEYS))
    grids, base_grids = [], []
    model_rows: list[dict] = []
    base_rows: list[dict] = []
    ceiling: list[float] = []
    batches = tqdm(take(loader, ev.pairs), total=-(-ev.pairs // ev.batch_size), desc="evaluate", unit="batch")
    for i, batch in enumerate(batches):
        batch = move_data_to_device(batch, device)
        generator = torch.Generator(device).manual_seed(cfg.seed + i)
        out = task.sample(batch, num_steps=ev.steps, generator=generator)
        generator = torch.Generator(device).manual_seed(cfg.seed + i)  # same noise for the baseline
        swapped = other_identity(batch)
        base = task.sample(swapped, num_steps=ev.steps, generator=generator)
        model_rows += model_eval.update(out, batch)
        base_rows += base_eval.update(base, batch)  # scored against the TRUE profile and target
        if "icp" in extractors.identity:  # the ceiling: the true render of the target view
            truth = extractors.identity["icp"](batch[K.TARGET]).embeddings
            ref = extractors.identity["icp"](batch[K.PROFILE]).embeddings
            ceiling += M.embedding_cosine(truth, ref).tolist()
        if hasattr(task, "predict_flow") and K.FLOW_GT in batch:
            from icp.tasks.adaptation import flow_metrics, flow_picture

            flows = task.predict_flow(batch)
            found = flow_metrics(flows, task.match_levels, batch, task.pck_alpha)
            flow_avg.update({k: found[k].reshape(1) for k in FLOW_KEYS})
            if i == 0:
                picture = flow_picture(flows, task.match_levels, batch, count=6)[None]
                scale = max(1, 96 // batch[K.TARGET].shape[-1])
                save_image(torch.nn.functional.interpolate(picture, scale_factor=scale, mode="nearest"),
                           out_dir / "flows.png")
        if i == 0:
            n = min(6, out.shape[0])
            grids = [batch[K.PROFILE][:n], batch[K.TARGET_MASKED][:n], out[:n], batch[K.TARGET][:n]]
            base_grids = [swapped[K.PROFILE][:n], base[:n], batch[K.TARGET][:n]]
    scores, baseline = model_eval.compute(), base_eval.compute()
    if flow_avg.update_count:
        scores.update({k: float(v) for k, v in flow_avg.compute().items()})
    _save_rows(out_dir / "grid.png", grids)
    _save_rows(out_dir / "baseline_grid.png", base_grids)
    relight = relighting_strip(task, cfg, out_dir / "relight.png", device)
    paired = paired_difference(model_rows, base_rows, key="id_cos_icp" if "icp" in extractors.identity else None)
    if ceiling:
        paired["true_render_id_cos"] = sum(ceiling) / len(ceiling)
    return _summarise(out_dir, scores, baseline, extractors, relight, paired)


def _save_rows(path: Path, rows: list[torch.Tensor]) -> None:
    if rows:
        # One row per sample: its columns are the given image kinds.
        tiles = torch.stack(rows, dim=1).flatten(0, 1)
        if tiles.shape[-1] < 96:  # tiny renders: enlarge (nearest) so a person can see them
            tiles = torch.nn.functional.interpolate(tiles.float(), scale_factor=96 // tiles.shape[-1], mode="nearest")
        save_image(make_grid(tiles.float().cpu() * 0.5 + 0.5, nrow=len(rows), padding=2), path)


def relighting_strip(task, cfg: DictConfig, path: Path, device: str) -> dict:
    """One held-out identity in one pose under several lights: target, generation per light."""
    from icp.render import renderer as R
    from icp.render.lighting import sample_light
    from icp.data.masking import apply_mask, random_patch_mask

    ev, res = cfg.evaluate, cfg.data.resolution
    identity_index = int(cfg.data.identities)  # the first held-out identity
    ident = R.sample_identity(identity_index, cfg.data.seed)[None]
    pose_p, light_p, bg_p = R.sample_view(identity_index, 0, cfg.data.seed)
    pose_t, _, bg_t = R.sample_view(identity_index, 1, cfg.data.seed)
    profile = R.render(ident, pose_p[None], light_p[None], bg_p[None], res)["rgb"] * 2 - 1
    g = torch.Generator().manual_seed(cfg.seed)
    lights = torch.stack([sample_light(g) for _ in range(ev.relight_lights)])
    n = lights.shape[0]
    targets = R.render(ident.expand(n, -1), pose_t[None].expand(n, -1), lights, bg_t[None].expand(n, -1), res)["rgb"] * 2 - 1
    keep = random_patch_mask((1, res, res), ev.mask_ratio, ev.patch_size, generator=g).expand(n, -1, -1, -1)
    batch = move_data_to_device({K.PROFILE: profile.expand(n, -1, -1, -1), K.TARGET: targets,
                        K.TARGET_MASKED: apply_mask(targets, keep), K.TARGET_KEEP: keep}, device)
    out = task.sample(batch, num_steps=ev.steps, generator=torch.Generator(device).manual_seed(cfg.seed))
    _save_rows(path, [batch[K.PROFILE], batch[K.TARGET_MASKED], out, batch[K.TARGET]])
    # Relighting works if each output's lighting follows its own target rather than a fixed one.
    mask = torch.ones_like(out[:, :1])
    own = M.lighting_error(out, batch[K.TARGET], mask)[0].mean()
    other = M.lighting_error(out, batch[K.TARGET].roll(1, dims=0), mask)[0].mean()
    return {"light_err_own_target": float(own), "light_err_other_light": float(other)}


def paired_difference(model_rows: list[dict], base_rows: list[dict], key: str | None) -> dict:
    """Per-pair model - baseline differences of ``key``: mean, standard error, win rate.

    Pairs share the masked target and the noise, so the paired difference isolates what the
    profile contributes, and its standard error says whether +0.09 is more than chance.
    """
    if key is None:
        return {}
    diffs = [m[key] - b[key] for m, b in zip(model_rows, base_rows)
             if m.get(key) == m.get(key) and b.get(key) == b.get(key)]  # drop NaN (no valid sample)
    if len(diffs) < 2:
        return {}
    n = len(diffs)
    mean = sum(diffs) / n
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    return {"metric": key, "pairs": n, "mean_diff": mean, "stderr": sd / n ** 0.5,
            "win_rate": sum(d > 0 for d in diffs) / n}


def _summarise(out_dir: Path, scores: dict, baseline: dict, extractors, relight: dict, paired: dict) -> dict:
    described = extractors.describe()
    rows = []
    for name in sorted(set(scores) | set(baseline)):
        value, base = scores.get(name), baseline.get(name)
        lower = LOWER_IS_BETTER.get(name, False)
        if value is None or base is None:
            better = None
        elif abs(value - base) <= 1e-6 * max(abs(value), abs(base), 1.0):
            better = "tie"
        else:
            better = "icp" if (value < base) == lower else "baseline"
        extractor = extractor_of(name, described)
        rows.append({"name": name, "value": _f(value), "baseline": _f(base), "better": better,
                     "extractor": extractor, "meaning": MEANINGS.get(name, "")})
    for name, why in extractors.unavailable.items():
        rows.append({"name": name, "value": "unavailable", "meaning": why})
    summary = identity_verdict(scores, baseline, paired)
    if "flow_epe" in scores and "flow_epe_zero" in scores:
        learned = scores["flow_epe"] < scores["flow_epe_zero"]
        summary += (f" Matching: flow EPE {scores['flow_epe']:.2f} px vs {scores['flow_epe_zero']:.2f} px for the "
                    f"zero flow, so the Matching Net {'has' if learned else 'has NOT yet'} learned useful "
                    "correspondence at this scale.")
    notes = [f"relighting: lighting error of each output vs its own target's light {relight['light_err_own_target']:.4f}, "
             f"vs another light {relight['light_err_other_light']:.4f} (lower own = the output follows the new light)",
             "baseline = the same model, masked targets and noise, with each profile swapped for another held-out identity's"]
    result = {"summary": summary, "metrics": rows, "extractors": described, "relighting": relight,
              "paired_identity": paired, "notes": notes}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return {"metrics": str(out_dir / "metrics.json"), "summary": summary}


def extractor_of(metric: str, described: dict) -> str:
    """Which model produced a metric's features (every report names it)."""
    for prefix in ("id_cos_", "face_fail_"):
        if metric.startswith(prefix):
            entry = described.get("identity_" + metric[len(prefix):], {})
            return entry.get("label") or entry.get("name", "?")
    if metric in ("fid", "kid"):
        return described.get("inception", {}).get("name", "?")
    if metric.startswith("clip_"):
        return described.get("clip", {}).get("name", "?")
    return "renderer ground truth"


def identity_verdict(scores: dict, baseline: dict, paired: dict | None = None) -> str:
    key = "id_cos_icp" if "id_cos_icp" in scores else next((k for k in scores if k.startswith("id_cos_")), None)
    if key is None:
        return "No identity extractor was available, so identity preservation was not measured."
    ours, base = float(scores[key]), float(baseline[key])
    verdict = "beats" if ours > base else "does NOT beat"
    text = (f"Identity: generated portraits of held-out identities have {key} = {ours:.3f} to their profile; "
            f"the other-identity baseline has {base:.3f}. icp {verdict} the baseline by {ours - base:+.3f}")
    if paired:
        text += (f" (paired over {paired['pairs']} pairs: {paired['mean_diff']:+.3f} ± {paired['stderr']:.3f} s.e., "
                 f"icp closer in {paired['win_rate']:.0%} of pairs)")
        if "true_render_id_cos" in paired:
            text += f"; the true render of the target view scores {paired['true_render_id_cos']:.3f} (the ceiling)"
    return text + "."


def _f(value):
    return None if value is None else float(value)
