"""The geometry probe's errors against the renderer's ground truth: pure functions on tensors.

Used by the probe's training task (its validation) and by the view-consistency metrics
(icp.eval.geometry), which is why they live here, below both. Units: landmark errors as a
fraction of the image side, yaw/pitch in degrees, IoU of (B, 1, H, W) masks.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


def landmark_error(pred: Tensor, true: Tensor, visible: Tensor, size: int | float) -> tuple[Tensor, Tensor]:
    """Mean distance (B,) over the visible landmarks, divided by ``size`` (the image side), and
    valid (B,) where at least one landmark is visible. pred/true (B, K, 2) pixels; visible (B, K)."""
    vis = visible.bool().to(pred.device)
    dist = (pred.float() - true.float().to(pred.device)).norm(dim=-1)
    count = vis.sum(1)
    err = torch.where(vis, dist, torch.zeros_like(dist)).sum(1) / count.clamp_min(1) / float(size)
    valid = count > 0
    return torch.where(valid, err, torch.zeros_like(err)), valid


def pose_error(pred: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    """|yaw| and |pitch| errors (B,) in degrees. pred (B, >=2) and true (B, >=2): yaw, pitch[, roll]."""
    diff = (pred[:, :2].float() - true[:, :2].float().to(pred.device)).abs()
    return diff[:, 0], diff[:, 1]


def mask_iou(pred: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    """IoU (B,) of two (B, 1, H, W) masks (>0.5 = inside) and valid (B,) where their union is not
    empty. ``pred`` is resampled (nearest) to ``true``'s size when they differ."""
    if pred.shape[-2:] != true.shape[-2:]:
        pred = F.interpolate(pred.float(), size=true.shape[-2:], mode="nearest")
    a, b = pred.float().flatten(1) > 0.5, true.float().to(pred.device).flatten(1) > 0.5
    union = (a | b).sum(1)
    iou = (a & b).sum(1) / union.clamp_min(1)
    return iou.float(), union > 0


def probe_reliability(probe, batches: Iterable[dict], role: str = "profile") -> dict:
    """The probe's error on held-out TRUE renders: the floor of its figures on outputs.

    ``batches`` hold the ``role`` view's image and ground truth (``profile``: images_only batches
    of ShardDataModule; ``target``: pair batches). Returns means over all views (landmark_err as
    a fraction of the image side and in pixels, yaw_err, pitch_err in degrees, silhouette_iou),
    the 90th percentile of landmark_err_px and yaw_err, yaw_err by |yaw| bucket, the sample count
    and the image size; :func:`reliability_line` renders it as one Markdown line.
    """
    rows: dict[str, list[Tensor]] = {k: [] for k in ("lm", "yaw", "pitch", "iou", "true_yaw", "lm_ok", "iou_ok")}
    size = None
    for batch in batches:
        images = batch[role]
        size = images.shape[-1]
        read = probe(images)
        vis = batch.get(f"{role}_landmarks_visible")
        lm = batch[f"{role}_landmarks"]
        vis = torch.ones(lm.shape[:2], dtype=torch.bool) if vis is None else vis
        err, ok = landmark_error(read.landmarks, lm, vis, size)
        yaw, pitch = pose_error(read.pose, batch[f"{role}_pose"])
        iou, iou_ok = mask_iou(read.mask, batch[f"{role}_fg"])
        for key, value in (("lm", err), ("lm_ok", ok), ("yaw", yaw), ("pitch", pitch), ("iou", iou),
                           ("iou_ok", iou_ok), ("true_yaw", batch[f"{role}_pose"][:, 0])):
            rows[key].append(value.detach().float().cpu())
    if size is None:
        return {"n": 0}
    cat = {k: torch.cat(v) for k, v in rows.items()}
    lm = cat["lm"][cat["lm_ok"].bool()]
    out = {
        "n": int(len(cat["yaw"])), "resolution": int(size),
        "landmark_err": float(lm.mean()) if len(lm) else math.nan,
        "landmark_err_px": float(lm.mean() * size) if len(lm) else math.nan,
        "landmark_err_px_p90": float(torch.quantile(lm, 0.9) * size) if len(lm) else math.nan,
        "yaw_err": float(cat["yaw"].mean()), "yaw_err_p90": float(torch.quantile(cat["yaw"], 0.9)),
        "pitch_err": float(cat["pitch"].mean()),
        "silhouette_iou": float(cat["iou"][cat["iou_ok"].bool()].mean()),
        "yaw_err_by_abs_yaw": {},
    }
    for lo, hi in ((0, 30), (30, 60), (60, 181)):
        sel = (cat["true_yaw"].abs() >= lo) & (cat["true_yaw"].abs() < hi)
        if sel.any():
            out["yaw_err_by_abs_yaw"][f"{lo}-{min(hi, 90)}"] = float(cat["yaw"][sel].mean())
    return out
