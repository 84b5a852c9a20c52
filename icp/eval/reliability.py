"""How far an identity extractor's numbers can be trusted (DESIGN §6): verification on held-out
identities, overall and by yaw difference, and how much blur lowers same-person scores.

Inputs are several views per held-out identity (``heldout_views`` renders them exactly like the
held-out shards: ``render_group`` seeded by (seed, identity, view)). Images are scored the way the
evaluator scores them: the head only (``icp.data.masking.head_only``) when head masks are given.

* verification: every unordered pair of images is genuine (same identity) or impostor; per bucket of
  |yaw_a - yaw_b| (degrees) both kinds are counted in that bucket, so a bucket says how well the
  extractor tells people apart *at that pose difference*. ROC AUC (Mann-Whitney, ties count half)
  and TAR at FAR f: the threshold is the (floor(f * impostors) + 1)-th highest impostor score and a
  pair is accepted when its score is strictly above it, so the realised FAR is at most f (with fewer
  than 1/f impostors it is 0: the table gives the counts so a reader sees that resolution).
* blur: every genuine pair scored with one side blurred (Gaussian sigma px, before masking, as a soft
  generated output is) against both sides sharp: the drop of the mean genuine cosine, and the AUC.

Pure functions of tensors except ``heldout_views`` (renders) and the extractor calls.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from icp.data.masking import head_only

YAW_EDGES = (0.0, 30.0, 60.0, 180.0)
BLUR_SIGMAS = (1.0, 2.0)
FAR = 0.01


def embed(extractor: Callable, images: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """(N, D) L2-normalised embeddings and (N,) bool 'face found' of ``extractor`` on ``images``.

    Accepts a face extractor (returns ``FaceFeatures``) or any callable returning (N, D) features."""
    embs, found = [], []
    for start in range(0, len(images), batch_size):
        out = extractor(images[start:start + batch_size])
        if hasattr(out, "embeddings"):
            embs.append(out.embeddings.float().cpu()), found.append(out.detected.bool().cpu())
        else:
            embs.append(F.normalize(out.float().cpu(), dim=1)), found.append(torch.ones(len(out), dtype=torch.bool))
    return torch.cat(embs), torch.cat(found)


def roc_auc(scores: Tensor, genuine: Tensor) -> float:
    """Probability that a random genuine pair scores above a random impostor pair (ties half); NaN
    without both kinds."""
    genuine = genuine.bool()
    n_pos, n_neg = int(genuine.sum()), int((~genuine).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = torch.argsort(scores.double())
    s = scores.double()[order]
    ranks = torch.empty_like(s)
    ranks[order] = _average_ranks(s)
    u = ranks[genuine].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _average_ranks(sorted_scores: Tensor) -> Tensor:
    """1-based ranks of ascending ``sorted_scores``, tied values sharing their mean rank."""
    n = len(sorted_scores)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    return mean_rank[inverse] if n else sorted_scores


def tar_at_far(scores: Tensor, genuine: Tensor, far: float = FAR) -> tuple[float, float]:
    """(TAR, threshold) at false-accept rate ``far`` (see the module docstring); NaN without both kinds."""
    genuine = genuine.bool()
    imp, gen = scores[~genuine].double(), scores[genuine].double()
    if len(imp) == 0 or len(gen) == 0:
        return math.nan, math.nan
    k = int(math.floor(far * len(imp) + 1e-9))  # impostors allowed above the threshold
    threshold = float(torch.sort(imp, descending=True).values[min(k, len(imp) - 1)])
    if k >= len(imp):
        threshold = -math.inf
    return float((gen > threshold).double().mean()), threshold


def pairs(emb: Tensor, identity: Tensor, yaw: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
    """Every unordered pair i < j of valid images: cosine score, genuine, |yaw difference| (degrees)."""
    n = len(emb)
    i, j = torch.triu_indices(n, n, offset=1)
    keep = torch.ones(len(i), dtype=torch.bool) if valid is None else (valid[i] & valid[j])
    i, j = i[keep], j[keep]
    return {"score": (emb[i] * emb[j]).sum(1), "genuine": identity[i] == identity[j],
            "yaw_diff": (yaw[i].double() - yaw[j].double()).abs()}


def verification(scores: Tensor, genuine: Tensor, far: float = FAR) -> dict[str, float]:
    tar, threshold = tar_at_far(scores, genuine, far)
    gen, imp = scores[genuine.bool()], scores[~genuine.bool()]
    return {"auc": roc_auc(scores, genuine), "tar": tar, "threshold": threshold,
            "n_genuine": int(len(gen)), "n_impostor": int(len(imp)),
            "mean_genuine": float(gen.mean()) if len(gen) else math.nan,
            "mean_impostor": float(imp.mean()) if len(imp) else math.nan}


def bucket_name(lo: float, hi: float) -> str:
    return f"[{lo:g},{hi:g})"


def verification_by_yaw(emb: Tensor, identity: Tensor, yaw: Tensor, edges: Sequence[float] = YAW_EDGES,
                        far: float = FAR, valid: Tensor | None = None) -> dict[str, dict]:
    """{"all": ..., "[0,30)": ..., ...}: ``verification`` of all pairs, then of the pairs per yaw bucket."""
    p = pairs(emb, identity, yaw, valid)
    out = {"all": verification(p["score"], p["genuine"], far)}
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (p["yaw_diff"] >= lo) & (p["yaw_diff"] < hi)
        out[bucket_name(lo, hi)] = verification(p["score"][sel], p["genuine"][sel], far)
    return out


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    from icp.tasks.embedder import gaussian_blur as blur  # the training augmentation's own blur

    return blur(images, sigma)


def _inputs(images: Tensor, fg: Tensor | None) -> Tensor:
    return images if fg is None else head_only(images, fg)


def blur_drop(extractor: Callable, images: Tensor, identity: Tensor, fg: Tensor | None = None,
              sigmas: Sequence[float] = BLUR_SIGMAS, batch_size: int = 64) -> dict[str, dict]:
    """Per sigma (px at the images' resolution): the mean genuine cosine with one side of every pair
    blurred, its drop from the sharp mean, and the AUC of sharp-vs-blurred pairs. Key "0" = sharp."""
    sharp, ok = embed(extractor, _inputs(images, fg), batch_size)
    n = len(images)
    off_diag = ~torch.eye(n, dtype=torch.bool)
    genuine = (identity[:, None] == identity[None, :]) & off_diag
    out = {}
    for sigma in (0.0, *sigmas):
        blurred, ok_b = (sharp, ok) if sigma == 0 else embed(extractor, _inputs(gaussian_blur(images, sigma), fg), batch_size)
        sims = sharp @ blurred.T                         # row: sharp image, column: blurred image
        use = off_diag & ok[:, None] & ok_b[None, :]
        g = genuine[use]
        mean = float(sims[use][g].mean()) if bool(g.any()) else math.nan
        out[f"{sigma:g}"] = {"sigma": float(sigma), "mean_genuine": mean, "auc": roc_auc(sims[use], g),
                             "n_genuine": int(g.sum()), "valid": int(ok_b.sum())}
    base = out["0"]["mean_genuine"]
    for row in out.values():
        row["drop"] = base - row["mean_genuine"]
    return out


def heldout_views(first: int, count: int, views: int, resolution: int, seed: int) -> dict[str, Tensor]:
    """``views`` renders of each held-out identity ``first .. first+count-1`` (the held-out shards'
    views 0..V-1, more are new views of the same heads): images (N,3,H,W) in [-1,1], fg (N,1,H,W),
    identity (N,), yaw (N,) degrees."""
    from icp.render.renderer import render_group

    groups = [render_group(i, views, resolution, seed) for i in range(first, first + count)]
    return {"images": torch.cat([g["rgb"] for g in groups]) * 2 - 1, "fg": torch.cat([g["fg"] for g in groups]),
            "identity": torch.cat([g["identity_index"] for g in groups]),
            "yaw": torch.cat([g["pose"][:, 0] for g in groups])}


def reliability_report(extractor: Callable, views: dict[str, Tensor], edges: Sequence[float] = YAW_EDGES,
                       sigmas: Sequence[float] = BLUR_SIGMAS, far: float = FAR, batch_size: int = 64) -> dict:
    """Verification by yaw bucket and the blur drop of ``extractor`` on ``views`` (``heldout_views``'s
    keys; ``fg`` may be None: whole images). A JSON-able dict; ``reliability_markdown`` prints it."""
    images, identity, fg = views["images"].float(), views["identity"].long().cpu(), views.get("fg")
    emb, found = embed(extractor, _inputs(images, fg), batch_size)
    return {
        "extractor": getattr(extractor, "name", type(extractor).__name__),
        "label": getattr(extractor, "label", None),
        "sha256": getattr(extractor, "weights_sha256", None),
        "head_only": fg is not None,
        "resolution": int(images.shape[-1]),
        "identities": int(len(torch.unique(identity))),
        "images": int(len(images)),
        "valid": int(found.sum()),
        "far": far,
        "verification": verification_by_yaw(emb, identity, views["yaw"].cpu(), edges, far, valid=found),
        "blur": blur_drop(extractor, images, identity, fg, sigmas, batch_size),
    }


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def reliability_markdown(report: dict) -> str:
    """Two short tables: verification by yaw difference, and the blur drop."""
    far = report["far"]
    head = "head only" if report["head_only"] else "whole image"
    lines = [f"Identity extractor reliability: {report.get('label') or report['extractor']} on "
             f"{report['identities']} held-out identities, {report['images']} images "
             f"({report['valid']} with a face), {report['resolution']} px, {head}.", "",
             f"| pairs (yaw difference) | ROC AUC | TAR @ FAR {far:.0%} | genuine | impostor | mean cos genuine | mean cos impostor |",
             "|---|---|---|---|---|---|---|"]
    for name, v in report["verification"].items():
        label = "all" if name == "all" else f"{name} deg"
        lines.append(f"| {label} | {_f(v['auc'])} | {_f(v['tar'])} | {v['n_genuine']} | {v['n_impostor']} | "
                     f"{_f(v['mean_genuine'])} | {_f(v['mean_impostor'])} |")
    lines += ["", "| blur (one side, sigma px) | mean cos genuine | drop | ROC AUC |", "|---|---|---|---|"]
    for v in report["blur"].values():
        label = "none" if v["sigma"] == 0 else f"{v['sigma']:g}"
        lines.append(f"| {label} | {_f(v['mean_genuine'])} | {_f(v['drop'])} | {_f(v['auc'])} |")
    few = [n for n, v in report["verification"].items() if v["n_impostor"] < math.ceil(1 / far)]
    if few:
        lines += ["", f"TAR @ FAR {far:.0%} in {', '.join(few)}: fewer than {math.ceil(1 / far)} impostor pairs, so the "
                  "threshold is the highest impostor score (FAR 0)."]
    return "\n".join(lines) + "\n"
