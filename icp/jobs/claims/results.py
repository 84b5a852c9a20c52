"""What the claims study found: each seed's results, and all seeds pooled.

``collect`` reads one seed's root (flow curves, evaluation results, the embedder's quality);
``merge`` pools several seeds (per-pair rows keyed by seed, summaries recomputed with
identity-bootstrap intervals); the masking and warping tables are built from the pooled rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from icp.eval import stats
from icp.jobs.claims import verdicts as V
from icp.jobs.claims.measure import summarise
from icp.jobs.claims.plan import eval_path, ratio_tag
from icp.jobs.runner import Job

# flow curve -> the adaptation fit that measures it ("supervised": the true-flow reference, if planned)
CURVES = {"base": "adapt_base", "random": "adapt_random", "supervised": "adapt_flowsup"}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(cfg: DictConfig, jobs: dict[str, Job]) -> dict:
    """Everything finished so far: flow curves, evaluations, embedder quality."""
    out: dict = {"curves": {}, "evals": {}}
    for init, name in CURVES.items():
        curve = _load(jobs[name].run_dir / "flow_curve.json") if name in jobs else None
        if curve:
            out["curves"][init] = curve
    for name, job in jobs.items():
        if job.kind == "step":
            out["evals"][name] = _load(eval_path(cfg, job))
    emb = _load(jobs["embedder"].run_dir / "fit_metrics.json")
    out["embedder_auc"] = emb.get("val/verif_auc") if emb else None
    return out


def merge(founds: list[dict]) -> dict:
    """Every seed's results as one: per-pair rows pooled (pairs keyed by seed), summaries recomputed
    with identity-bootstrap intervals, flow curves averaged per step (each seed's curve kept)."""
    if len(founds) == 1:
        return founds[0]
    out: dict = {"curves": {}, "evals": {}, "per_seed": founds}
    for init in {i for f in founds for i in f["curves"]}:
        curves = [f["curves"][init] for f in founds if init in f["curves"]]
        steps = sorted(set.intersection(*({p["step"] for p in c} for c in curves)))
        out["curves"][init] = [{"step": s, **{k: sum(next(p[k] for p in c if p["step"] == s) for c in curves) / len(curves)
                                               for k in ("flow_epe", "flow_pck", "flow_epe_zero")}} for s in steps]
    names = {n for f in founds for n in f["evals"]}
    for name in names:
        found = [(s, f["evals"].get(name)) for s, f in enumerate(founds)]
        if any(res is None for _, res in found):
            out["evals"][name] = None
            continue
        first = found[0][1]
        res = {k: v for k, v in first.items() if k not in ("rows", "summary", "buckets", "models")}
        if "rows" in first:
            res["rows"] = [{**r, "seed": s, "pair": f"s{s}:{r.get('pair', i)}"} for s, e in found
                           for i, r in enumerate(e["rows"])]
            res["summary"] = summarise(res["rows"], tuple(first["summary"]))
        if "buckets" in first:
            res["buckets"] = {b: summarise([r for r in res["rows"] if str(r["bucket"]) == b], tuple(first["summary"]))
                              for b in first["buckets"]}
        if "models" in first:
            res["models"] = {}
            for label, model in first["models"].items():
                rows = [{**r, "seed": s} for s, e in found for r in e["models"][label]["rows"]]
                res["models"][label] = {**model, "rows": rows, "summary": summarise(rows, tuple(model["summary"]))}
        out["evals"][name] = res
    aucs = [f["embedder_auc"] for f in founds if f.get("embedder_auc") is not None]
    out["embedder_auc"] = sum(aucs) / len(aucs) if aucs else None
    return out


def masking_rows(cfg: DictConfig, found: dict) -> list[tuple[float, dict]]:
    rows = []
    for ratio in cfg.claims.masking.ratios:
        res = found["evals"].get(f"eval_masking_{ratio_tag(ratio)}")
        if res:
            rows.append((float(ratio), res["summary"]))
    return rows


def warp_table(found: dict) -> dict | None:
    warp, nowarp = found["evals"].get("eval_warping_warp"), found["evals"].get("eval_warping_nowarp")
    if not warp or not nowarp:
        return None
    edges = warp["edges"]
    other = {r["pair"]: r for r in nowarp["rows"]}

    def delta(rows: list[dict], ref: dict, key: str = "id_cos") -> dict:
        return stats.compare([r[key] for r in rows], [ref[r["pair"]][key] for r in rows], [r["identity"] for r in rows])

    buckets = []
    for k in range(len(edges) - 1):
        rows = [r for r in warp["rows"] if r["bucket"] == k and r["pair"] in other]
        buckets.append({"label": V._bucket_label(edges, k), "n": len(rows),
                        "warp": warp["buckets"].get(str(k)), "nowarp": nowarp["buckets"].get(str(k)),
                        "delta": delta(rows, other)})
    out = {"buckets": buckets, "delta": delta([r for r in warp["rows"] if r["pair"] in other], other)}
    true = found["evals"].get("eval_warping_truewarp")
    if true:  # the oracle: the same pairs, masks and noise, warped with the renderer's flow
        oracle = {r["pair"]: r for r in true["rows"]}
        for k, b in enumerate(buckets):
            both = [r for r in true["rows"] if r["bucket"] == k and r["pair"] in other]
            b["true"] = true["buckets"].get(str(k))
            b["true_delta"] = delta(both, other)
        out["true_delta"] = delta([r for r in oracle.values() if r["pair"] in other], other)
    return out
