"""The evaluation jobs of the paper-claims run: masking, warping, relighting (claim 1's flow curve
is measured during the adaptation fits by ``icp.tasks.flows.FlowCurve``).

Every score is per pair, on held-out identities, from the one paired evaluation
(icp.eval.paired): the same model, the same masked target and the same sampling noise, with the
profile swapped for another held-out identity's (icp.eval.baselines.other_identity, never the same
identity). ``id_cos - id_cos_base`` is then what the profile contributes to the output's identity --
the quantity the masking claim is about. Relighting is icp.eval.relighting, beside model-free
inpainting of the masked target.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from icp.eval import baselines as B
from icp.eval import relighting as RL
from icp.eval import stats
from icp.eval.evaluator import build_extractors
from icp.eval.grids import save_grid
from icp.eval.paired import METHOD, evaluate_pairs
from icp.eval import pairs as P
from icp.tasks.loading import load_task

ROW_KEYS = ("id_cos", "id_cos_base", "id_paired", "ceiling", "psnr", "psnr_fg", "ssim", "light_colour_err", "shading_err")


def summarise(rows: list[dict], keys=ROW_KEYS) -> dict:
    """Mean of each key with its 95 % identity-bootstrap interval (icp.eval.stats)."""
    return {k: stats.bootstrap_mean([r.get(k, math.nan) for r in rows], [r["identity"] for r in rows]) for k in keys}


class Scorer:
    """The claims' use of the one paired evaluation (icp.eval.paired): the method beside the
    other-identity baseline (same noise) and the true render (the ceiling), in the embedder."""

    def __init__(self, embedder: str, device: str, steps: int, seed: int, probe: str | None = None):
        self.extractors = build_extractors(identity=("icp",), embedder=embedder, fid=False, device=device, probe=probe)
        self.device, self.steps, self.seed = device, steps, seed
        self.embed = self.extractors.identity["icp"]

    def __call__(self, task, batches, grid_samples: int = 0) -> tuple[list[dict], list]:
        res = evaluate_pairs(task.sample, batches, self.extractors, self.device,
                             baselines={"other_identity": B.other_identity, "truth": B.truth},
                             num_steps=self.steps, seed=self.seed, grid_samples=grid_samples)
        rows = []
        for m, b, t in zip(res.rows[METHOD], res.rows["other_identity"], res.rows["truth"]):
            r = {**m, "id_cos": m["id_cos_icp"], "ceiling": t["id_cos_icp"]}
            if b["id_cos_icp"] == b["id_cos_icp"]:  # NaN: no other identity in that batch
                r["id_cos_base"] = b["id_cos_icp"]
                r["id_paired"] = r["id_cos"] - r["id_cos_base"]
            rows.append(r)
        return rows, res.grid_columns


def _groups(cfg: DictConfig, views: int) -> dict[int, dict]:
    d = cfg.data
    return P.render_heldout(int(d.identities), int(d.heldout_identities), views, int(d.resolution), int(d.seed))


def masking(cfg: DictConfig, spec: dict, out_dir: Path, name: str, device: str) -> dict:
    ev, c = cfg.evaluate, cfg.claims.masking
    task = load_task(spec["run"], device=device)
    scorer = Scorer(spec["embedder"], device, int(ev.steps), int(cfg.seed), spec.get("probe"))
    groups = _groups(cfg, int(cfg.data.views))
    per_id = -(-int(c.pairs) // len(groups))
    chosen = P.random_pairs(sorted(groups), int(cfg.data.views), per_id, int(cfg.seed))[: int(c.pairs)]
    rows, columns = scorer(task, P.batches(groups, chosen, int(ev.batch_size), float(spec["mask_ratio"]),
                                           int(ev.patch_size), int(cfg.seed)), grid_samples=6)
    for r, (i, p, t) in zip(rows, chosen):  # the same pairs at every ratio: compared pair by pair
        r["pair"] = f"{i}:{p}:{t}"
    grid = str(save_grid(out_dir / f"{name}.png", columns))
    return {"rows": rows, "summary": summarise(rows), "grid": grid, "mask_ratio": spec["mask_ratio"],
            "grid_columns": "profile | masked target | generated | generated with another identity's profile | true render"}


def warping(cfg: DictConfig, spec: dict, out_dir: Path, name: str, device: str) -> dict:
    ev, c = cfg.evaluate, cfg.claims.warping
    task = load_task(spec["run"], device=device)
    scorer = Scorer(spec["embedder"], device, int(ev.steps), int(cfg.seed), spec.get("probe"))
    groups = _groups(cfg, int(c.views))
    edges = [float(e) for e in c.buckets]
    chosen = P.bucket_pairs(groups, edges, int(c.pairs_per_bucket), int(cfg.seed))
    rows, grid_cols = [], []
    for k, pairs in chosen.items():
        found, columns = scorer(task, P.batches(groups, pairs, int(ev.batch_size), float(spec["mask_ratio"]),
                                                int(ev.patch_size), int(cfg.seed)), grid_samples=3)
        for r, (i, p, t) in zip(found, pairs):
            r.update(bucket=k, pair=f"{i}:{p}:{t}", yaw_diff=P.yaw_difference(groups[i], p, t))
        rows += found
        if columns:
            grid_cols.append(columns)
    grid = None
    if grid_cols:  # 3 pairs per bucket, buckets top to bottom
        labels = [f"{edges[k]:g}-{edges[k + 1]:g}°" for k, cols in zip(chosen, grid_cols) for _ in range(len(cols[0][1]))]
        merged = [(label, torch.cat([cols[j][1] for cols in grid_cols])) for j, (label, _) in enumerate(grid_cols[0])]
        grid = str(save_grid(out_dir / f"{name}.png", merged, row_labels=labels))
    per_bucket = {str(k): summarise([r for r in rows if r["bucket"] == k]) for k in chosen}
    return {"rows": rows, "summary": summarise(rows), "buckets": per_bucket, "edges": edges, "grid": grid,
            "grid_columns": "profile | masked target | generated | generated with another identity's profile | "
                            "true render; rows: 3 pairs per yaw bucket, small to large"}


def relighting(cfg: DictConfig, spec: dict, out_dir: Path, name: str, device: str) -> dict:
    """Held-out identity and pose fixed, only the target light changes (paper claim d; icp.eval.relighting)."""
    ev, c, d = cfg.evaluate, cfg.claims.relighting, cfg.data
    seed = int(cfg.seed)
    s = RL.relight_set(int(d.identities), min(int(c.identities), int(d.heldout_identities)), int(c.lights),
                       int(d.resolution), int(d.seed), seed, float(spec["mask_ratio"]), int(ev.patch_size))
    embed = build_extractors(identity=("icp",), embedder=spec["embedder"], fid=False, device=device).identity["icp"]
    prof_emb = embed(s["profile"].to(device)).embeddings.cpu()
    keys = (*RL.KEYS, "id_cos")
    results = {}
    models = {label: RL.generate(load_task(run, device=device).sample, s, int(ev.steps), device, seed)
              for label, run in spec["runs"].items()}
    models["inpainting"] = RL.inpainted(s)  # the model-free baseline: the visible pixels carry the light too
    for label, out in models.items():
        rows = RL.scores(out, s)
        n_light = out.shape[1]
        for r in rows:
            emb = embed(out[r["identity"] - int(d.identities), r["light"]][None].to(device)).embeddings.cpu()
            r["id_cos"] = float((emb[0] * prof_emb[r["identity"] - int(d.identities)]).sum())
        cols, labels = RL.grid_columns(out, s)
        grid = str(save_grid(out_dir / f"{name}_{label}.png", cols, row_labels=labels))
        results[label] = {"rows": rows, "summary": summarise(rows, keys), "grid": grid}
    return {"models": results, "identities": int(s["profile"].shape[0]), "lights": n_light,
            "grid_columns": "profile, then one column per target light; per identity two rows: true render, generated"}


CLAIMS = {"masking": masking, "warping": warping, "relighting": relighting}
