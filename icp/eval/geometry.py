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


import torch
from torch import Tensor

from icp.data import keys as K
# The per-sample errors and the probe's floor are pure functions the probe's training task
# validates with too, so they live below both (tasks may not import eval).
from icp.models.probe_errors import landmark_error, mask_iou, pose_error, probe_reliability  # noqa: F401

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
