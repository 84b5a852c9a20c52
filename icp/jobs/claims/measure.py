"""The evaluation jobs of the paper-claims run: masking, warping, relighting (claim 1's flow curve
is measured during the adaptation fits by ``icp.tasks.adaptation.FlowCurve``).

Every score is per pair, on held-out identities, and comes with its paired baseline: the same
model, the same masked target and the same sampling noise, with the profile swapped for another
held-out identity's (``pairs.swap_profiles``). ``id_cos - id_cos_base`` is then what the profile
contributes to the output's identity -- the quantity the masking claim is about.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

from icp.jobs.claims import pairs as P
from icp.data import keys as K
from icp.eval import metrics as M
from icp.eval.evaluator import Evaluator, build_extractors
from icp.tasks.loading import load_task

ROW_KEYS = ("id_cos", "id_cos_base", "id_paired", "ceiling", "psnr", "psnr_fg", "ssim", "light_colour_err", "shading_err")


def mean_se(values: list[float]) -> dict:
    vals = [v for v in values if v == v and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    mean = sum(vals) / n
    sd = (sum((v - mean) ** 2 for v in vals) / (n - 1)) ** 0.5 if n > 1 else float("nan")
    return {"mean": mean, "se": sd / n ** 0.5 if n > 1 else float("nan"), "n": n}


def summarise(rows: list[dict], keys=ROW_KEYS) -> dict:
    return {k: mean_se([r[k] for r in rows if k in r]) for k in keys}


def save_rows(path: Path, columns: list[torch.Tensor]) -> str:
    """One row per sample, one column per image kind, enlarged (nearest) to ~96 px tiles."""
    tiles = torch.stack([c.detach().float().cpu() for c in columns], dim=1).flatten(0, 1)
    if tiles.shape[-1] < 96:
        tiles = torch.nn.functional.interpolate(tiles, scale_factor=96 // tiles.shape[-1], mode="nearest")
    save_image(make_grid((tiles.clamp(-1, 1) + 1) / 2, nrow=len(columns), padding=2, pad_value=1.0), path)
    return str(path)


class Scorer:
    """Generates a batch and its swapped-profile baseline with the same noise, and scores both."""

    def __init__(self, embedder: str, device: str, steps: int, seed: int):
        self.extractors = build_extractors(identity=("icp",), embedder=embedder, fid=False, device=device)
        self.device, self.steps, self.seed = device, steps, seed
        self.embed = self.extractors.identity["icp"]

    def sample(self, task, batch: dict, index: int) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(self.seed + index)
        return task.sample(batch, num_steps=self.steps, generator=generator)

    @torch.no_grad()
    def __call__(self, task, batch: dict, index: int) -> tuple[list[dict], dict]:
        batch = move_data_to_device(batch, self.device)
        out = self.sample(task, batch, index)
        swapped = P.swap_profiles(batch)
        base = self.sample(task, swapped, index) if swapped is not None else None  # same noise
        rows = Evaluator(self.extractors).to(self.device).update(out, batch)
        base_rows = Evaluator(self.extractors).to(self.device).update(base, batch) if base is not None else None
        ceiling = M.embedding_cosine(self.embed(batch[K.TARGET]).embeddings, self.embed(batch[K.PROFILE]).embeddings)
        out_rows = []
        for i, row in enumerate(rows):
            r = {"identity": row["identity"], "id_cos": row["id_cos_icp"], "ceiling": float(ceiling[i]),
                 **{k: row[k] for k in ("psnr", "psnr_fg", "ssim", "light_colour_err", "shading_err")}}
            if base_rows is not None:
                r["id_cos_base"] = base_rows[i]["id_cos_icp"]
                r["id_paired"] = r["id_cos"] - r["id_cos_base"]
            out_rows.append(r)
        return out_rows, {"out": out, "base": base, "batch": batch, "swapped": swapped}


def _groups(cfg: DictConfig, views: int) -> dict[int, dict]:
    d = cfg.data
    return P.render_heldout(int(d.identities), int(d.heldout_identities), views, int(d.resolution), int(d.seed))


def _grid_columns(res: dict, n: int) -> list[torch.Tensor]:
    b = res["batch"]
    cols = [b[K.PROFILE][:n], b[K.TARGET_MASKED][:n], res["out"][:n]]
    if res["base"] is not None:
        cols.append(res["base"][:n])
    return cols + [b[K.TARGET][:n]]


def masking(cfg: DictConfig, spec: dict, out_dir: Path, name: str, device: str) -> dict:
    ev, c = cfg.evaluate, cfg.claims.masking
    task = load_task(spec["run"], device=device)
    scorer = Scorer(spec["embedder"], device, int(ev.steps), int(cfg.seed))
    groups = _groups(cfg, int(cfg.data.views))
    per_id = -(-int(c.pairs) // len(groups))
    chosen = P.random_pairs(sorted(groups), int(cfg.data.views), per_id, int(cfg.seed))[: int(c.pairs)]
    rows, grid = [], None
    for k, batch in enumerate(P.batches(groups, chosen, int(ev.batch_size), float(spec["mask_ratio"]),
                                        int(ev.patch_size), int(cfg.seed))):
        found, res = scorer(task, batch, k)
        rows += found
        if grid is None:
            grid = save_rows(out_dir / f"{name}.png", _grid_columns(res, 6))
    return {"rows": rows, "summary": summarise(rows), "grid": grid, "mask_ratio": spec["mask_ratio"],
            "grid_columns": "profile | masked target | generated | generated with another identity's profile | true render"}


def warping(cfg: DictConfig, spec: dict, out_dir: Path, name: str, device: str) -> dict:
    ev, c = cfg.evaluate, cfg.claims.warping
    task = load_task(spec["run"], device=device)
    scorer = Scorer(spec["embedder"], device, int(ev.steps), int(cfg.seed))
    groups = _groups(cfg, int(c.views))
    edges = [float(e) for e in c.buckets]
    chosen = P.bucket_pairs(groups, edges, int(c.pairs_per_bucket), int(cfg.seed))
    rows, grid_cols = [], []
    for k, pairs in chosen.items():
        for j, batch in enumerate(P.batches(groups, pairs, int(ev.batch_size), float(spec["mask_ratio"]),
                                            int(ev.patch_size), int(cfg.seed))):
            found, res = scorer(task, batch, 100 * k + j)  # noise per (bucket, batch): same for both models
            start = j * int(ev.batch_size)
            for r, (i, p, t) in zip(found, pairs[start:start + len(found)]):
                r.update(bucket=k, pair=f"{i}:{p}:{t}", yaw_diff=P.yaw_difference(groups[i], p, t))
            rows += found
            if j == 0 and res["base"] is not None:
                grid_cols.append(_grid_columns(res, 3))
    grid = None
    if grid_cols:  # 3 pairs per bucket, buckets top to bottom
        grid = save_rows(out_dir / f"{name}.png", [torch.cat([g[c_] for g in grid_cols]) for c_ in range(5)])
    per_bucket = {str(k): summarise([r for r in rows if r["bucket"] == k]) for k in chosen}
    return {"rows": rows, "summary": summarise(rows), "buckets": per_bucket, "edges": edges, "grid": grid,
            "grid_columns": "profile | masked target | generated | generated with another identity's profile | "
                            "true render; rows: 3 pairs per yaw bucket, small to large"}


def relighting(cfg: DictConfig, spec: dict, out_dir: Path, name: str, device: str) -> dict:
    """Held-out identity and pose fixed, only the target light changes (paper claim d)."""
    from icp.render import renderer as R
    from icp.render.lighting import sample_light
    from icp.data.masking import apply_mask, random_patch_mask
    from icp.data.shards.read import stable_seed

    ev, c, d = cfg.evaluate, cfg.claims.relighting, cfg.data
    res_px, seed, first = int(d.resolution), int(cfg.seed), int(d.identities)
    n_id, n_light = min(int(c.identities), int(d.heldout_identities)), int(c.lights)
    profiles, targets, masks, fgs = [], [], [], []
    for k in range(first, first + n_id):
        ident = R.sample_identity(k, int(d.seed))[None]
        pose_p, light_p, bg_p = R.sample_view(k, 0, int(d.seed))
        pose_t, _, bg_t = R.sample_view(k, 1, int(d.seed))
        profiles.append(R.render(ident, pose_p[None], light_p[None], bg_p[None], res_px)["rgb"][0] * 2 - 1)
        g = torch.Generator().manual_seed(stable_seed(seed, k, 17))
        lights = torch.stack([sample_light(g) for _ in range(n_light)])
        rend = R.render(ident.expand(n_light, -1), pose_t[None].expand(n_light, -1), lights,
                        bg_t[None].expand(n_light, -1), res_px)
        targets.append(rend["rgb"] * 2 - 1)  # (L, 3, H, W): one pose, L lights
        fgs.append(rend["fg"][0])
        masks.append(random_patch_mask((1, res_px, res_px), float(spec["mask_ratio"]), int(ev.patch_size),
                                       generator=g)[0])  # one mask per identity: only the light changes
    profile, fg, keep = torch.stack(profiles), torch.stack(fgs), torch.stack(masks)
    target = torch.stack(targets)  # (N, L, 3, H, W)
    scorer = Scorer(spec["embedder"], device, int(ev.steps), seed)
    results = {}
    for label, run in spec["runs"].items():
        task = load_task(run, device=device)
        outs = []
        for l in range(n_light):
            light_l = target[:, l].contiguous()  # a strided slice sends CPU convs down a ~10x slower path
            batch = move_data_to_device({K.PROFILE: profile, K.TARGET: light_l, K.TARGET_KEEP: keep,
                                         K.TARGET_MASKED: apply_mask(light_l, keep)}, device)
            outs.append(scorer.sample(task, batch, 0).cpu())  # the same noise for every light
        out = torch.stack(outs, dim=1)  # (N, L, 3, H, W)
        prof_emb = scorer.embed(profile.to(device)).embeddings.cpu()
        rows = []
        for i in range(n_id):
            emb = scorer.embed(out[i].to(device)).embeddings.cpu()
            for l in range(n_light):
                m = fg[i][None]
                own_c, own_s = M.lighting_error(out[i, l][None], target[i, l][None], m)
                others = [m_ for m_ in range(n_light) if m_ != l]
                oth = [M.lighting_error(out[i, l][None], target[i, o][None], m) for o in others]
                gap = [M.lighting_error(target[i, l][None], target[i, o][None], m) for o in others]
                rows.append({"identity": first + i, "light": l, "own_colour": float(own_c), "own_shading": float(own_s),
                             "other_colour": sum(float(a) for a, _ in oth) / len(oth),
                             "other_shading": sum(float(b) for _, b in oth) / len(oth),
                             "truth_gap_colour": sum(float(a) for a, _ in gap) / len(gap),
                             "truth_gap_shading": sum(float(b) for _, b in gap) / len(gap),
                             "id_cos": float((emb[l] * prof_emb[i]).sum())})
        for r in rows:
            r["follow_colour"] = r["other_colour"] - r["own_colour"]
            r["follow_shading"] = r["other_shading"] - r["own_shading"]
        keys = ("own_colour", "other_colour", "follow_colour", "truth_gap_colour", "own_shading", "other_shading",
                "follow_shading", "truth_gap_shading", "id_cos")
        n_show = min(3, n_id)
        lines = [img for i in range(n_show) for img in (target[i], out[i])]  # per identity: truth, generated
        cols = [torch.stack([profile[i // 2] for i in range(len(lines))])]
        cols += [torch.stack([line[l] for line in lines]) for l in range(n_light)]
        grid = save_rows(out_dir / f"{name}_{label}.png", cols)
        results[label] = {"rows": rows, "summary": summarise(rows, keys), "grid": grid}
    return {"models": results, "identities": n_id, "lights": n_light,
            "grid_columns": "profile, then one column per target light; per identity two rows: true render, generated"}


CLAIMS = {"masking": masking, "warping": warping, "relighting": relighting}
