"""View consistency against ground truth: does the output take the TARGET's pose (paper §3.2-3.3)?

Pure functions on tensors. The output's geometry is read by two extractors -- the icp geometry
probe (``icp.models.probe``, trained by icp on true renders: silhouette, the renderer's K
landmarks, yaw and pitch) and, as the independent real check, dlib's 68-point shape predictor
(``icp.eval.dlib_landmarks``, five of its points mapped onto the renderer's) -- and compared with
the target's ground truth from the batch (icp/data/keys.py: TARGET_FG, TARGET_POSE,
TARGET_LANDMARKS, TARGET_LANDMARKS_VISIBLE).

Units: landmark errors are the mean Euclidean distance over the target's VISIBLE landmarks as a
fraction of the image side (0.03 = 1 px at 32 px, 2 px at 64 px), so runs at different
resolutions compare; yaw/pitch errors are absolute degrees; the silhouette IoU is of the
probe's head mask (logit > 0) of the output with the target's true foreground mask.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from icp.data import keys as K

PROBE_METRICS = ("landmark_err", "yaw_err", "pitch_err", "silhouette_iou")
DLIB_METRICS = ("landmark_err_dlib", "lm_fail_dlib")
MEANINGS = {
    "landmark_err": "icp geometry probe (trained by icp): mean distance of the output's landmarks from the target's "
                    "true visible landmarks, as a fraction of the image side (lower = output in the target's pose)",
    "yaw_err": "icp geometry probe (trained by icp): |yaw of the output - target yaw| in degrees",
    "pitch_err": "icp geometry probe (trained by icp): |pitch of the output - target pitch| in degrees",
    "silhouette_iou": "icp geometry probe (trained by icp): IoU of the output's head mask with the target's true "
                      "head mask (higher = the head sits where the target's does)",
    "landmark_err_dlib": "dlib 68-point predictor (real): mean distance of the output's eye centres, nose tip and "
                         "mouth corners from the target's true ones (visible only), fraction of the image side",
    "lm_fail_dlib": "fraction of outputs in which dlib's detector found no face (no landmarks)",
}
LOWER_IS_BETTER = frozenset({"landmark_err", "yaw_err", "pitch_err", "landmark_err_dlib", "lm_fail_dlib"})


# ------------------------------------------------------------------------ per-sample functions


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


# ------------------------------------------------------------------------ one evaluation batch


def view_scores(outputs: Tensor, batch: dict, probe=None, dlib=None) -> tuple[dict, dict]:
    """Per-sample (values, valid) of the view-consistency metrics for ``outputs`` vs the batch's
    TARGET ground truth; metrics whose ground truth the batch lacks are left out."""
    values: dict[str, Tensor] = {}
    valid: dict[str, Tensor] = {}
    size = outputs.shape[-1]
    dev = outputs.device
    true_lm, vis = batch.get(K.TARGET_LANDMARKS), batch.get(K.TARGET_LANDMARKS_VISIBLE)
    if true_lm is not None and vis is None:  # real imports: detected landmarks, all in view
        vis = torch.ones(true_lm.shape[:2], dtype=torch.bool)
    if probe is not None:
        read = probe(outputs)
        if true_lm is not None and true_lm.shape[1] == read.landmarks.shape[1]:
            values["landmark_err"], valid["landmark_err"] = landmark_error(read.landmarks, true_lm.to(dev), vis, size)
        pose = batch.get(K.TARGET_POSE)
        if pose is not None:
            values["yaw_err"], values["pitch_err"] = pose_error(read.pose, pose.to(dev))
        fg = batch.get(K.TARGET_FG)
        if fg is not None:
            values["silhouette_iou"], valid["silhouette_iou"] = mask_iou(read.mask, fg.to(dev))
    if dlib is not None:
        found = dlib(outputs)
        values["lm_fail_dlib"] = (~found.detected).float().to(dev)
        if true_lm is not None:
            from icp.eval.dlib_landmarks import RENDER_INDEX, to_render

            idx = list(RENDER_INDEX)
            if true_lm.shape[1] > max(idx):
                err, ok = landmark_error(to_render(found.points).to(dev), true_lm[:, idx].to(dev),
                                         vis[:, idx], size)
                values["landmark_err_dlib"] = err
                valid["landmark_err_dlib"] = ok & found.detected.to(dev)
    return values, valid


# ------------------------------------------------------------------------ the probe's own floor


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


def reliability_line(rel: dict, label: str = "icp-geometry-probe, trained by icp") -> str:
    """One Markdown line: the probe's floor on held-out true renders."""
    if not rel.get("n"):
        return f"- **{label}**: no held-out renders, reliability unknown"
    buckets = ", ".join(f"|yaw| {k}°: {v:.1f}°" for k, v in rel["yaw_err_by_abs_yaw"].items())
    return (f"- **{label}**, its own error on {rel['n']} held-out true renders at {rel['resolution']} px (the floor "
            f"below which its figures resolve nothing): landmark error {rel['landmark_err']:.4f} of the image side "
            f"({rel['landmark_err_px']:.2f} px, p90 {rel['landmark_err_px_p90']:.2f} px), yaw error "
            f"{rel['yaw_err']:.1f}° (p90 {rel['yaw_err_p90']:.1f}°; {buckets}), pitch error {rel['pitch_err']:.1f}°, "
            f"silhouette IoU {rel['silhouette_iou']:.3f}")
