"""ProbeTask: trains the geometry probe the view-consistency metrics read outputs with.

Batches are single views (``ShardDataModule(images_only=True)``): PROFILE with its ground truth
PROFILE_FG, PROFILE_LANDMARKS (+ _VISIBLE) and PROFILE_POSE. Losses: binary cross-entropy of the
head mask, L1 of the soft-argmax landmarks in pixels (visible ones weight 1, in-frame occluded ones
``occluded_weight``: their position follows from the pose, and training on them steadies the
heatmaps), L1 of yaw and pitch in units of 10 degrees. Augmentation (``augment``) makes it read
generated images too: light (gain, colour, gamma, offset), a new background behind the true mask,
Gaussian blur and noise, and a small shift/scale/rotation plus mirror whose effect on the labels
is exact (mirror: x -> W-1-x, left/right landmarks swap, yaw -> -yaw).

Validation is the probe's reliability on held-out true renders (icp.eval.geometry); the trained
network is exported to ``<run dir>/probe.pt`` (icp.models.probe.export) after every validation
and at the end of training, like the embedder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from icp.core.errors import DataError
from icp.data import keys as K
from icp.models import probe_errors as G
from icp.models.probe import GeometryProbeNet, export

# the renderer's left/right landmark pairs (head_model.canonical_landmarks order): eyes, mouth
# corners, brows, ears -- swapped by a mirror
MIRROR_PAIRS = ((0, 1), (3, 4), (6, 7), (10, 11))
NEEDS = (K.PROFILE, K.PROFILE_FG, K.PROFILE_LANDMARKS, K.PROFILE_POSE)


def mirror_order(k: int) -> list[int]:
    order = list(range(k))
    for a, b in MIRROR_PAIRS:
        if b < k:
            order[a], order[b] = b, a
    return order


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Per-sample Gaussian blur (sigma (B,) in pixels; 0 = unchanged)."""
    b, c, h, w = x.shape
    r = max(1, math.ceil(2.5 * float(sigma.max())))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)
    k = k.repeat_interleave(c, 0)                                    # (B*C, 2r+1)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(images: Tensor, fg: Tensor, landmarks: Tensor, visible: Tensor, pose: Tensor,
            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Augmented (images, fg, landmarks, visible, pose); the labels follow every geometric change."""
    b, _, h, w = images.shape
    dev, dt = images.device, images.dtype

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(dev, dt)

    x, fg, lm, vis, pose = images.float(), fg.float(), landmarks.float().clone(), visible.bool().clone(), pose.float().clone()
    # background: half the views get a random two-colour gradient behind the true mask
    swap = (rand(b) < 0.5).view(b, 1, 1, 1)
    c1, c2 = rand(b, 3, 1, 1) * 2 - 1, rand(b, 3, 1, 1) * 2 - 1
    angle = rand(b, 1, 1, 1) * 2 * math.pi
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=dev), torch.linspace(-1, 1, w, device=dev), indexing="ij")
    ramp = ((xs * angle.cos() + ys * angle.sin()) * 0.5 + 0.5).clamp(0, 1)
    bg = c1 + (c2 - c1) * ramp
    x = torch.where(swap, x * fg + bg * (1 - fg), x)
    # mirror
    flip = rand(b) < 0.5
    if flip.any():
        order = mirror_order(lm.shape[1])
        x[flip], fg[flip] = x[flip].flip(-1), fg[flip].flip(-1)
        lm_f = lm[flip][:, order]
        lm_f[..., 0] = (w - 1) - lm_f[..., 0]
        lm[flip], vis[flip] = lm_f, vis[flip][:, order]
        pose[flip, 0] = -pose[flip, 0]
        if pose.shape[1] > 2:
            pose[flip, 2] = -pose[flip, 2]
    # shift / scale / in-plane rotation (rotation only changes roll, which the probe does not read)
    scale = 1 + 0.08 * (rand(b) * 2 - 1)
    rot = math.radians(8) * (rand(b) * 2 - 1)
    shift = 0.08 * (rand(b, 2) * 2 - 1)
    a = torch.stack([torch.stack([rot.cos(), -rot.sin()], -1), torch.stack([rot.sin(), rot.cos()], -1)], -2) * scale[:, None, None]
    theta = torch.cat([a, shift[:, :, None]], 2)                      # output -> input, normalised
    grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    fg = (F.grid_sample(fg, grid, align_corners=False) > 0.5).float()
    size = torch.tensor([w, h], device=dev, dtype=torch.float32)
    u_in = (lm + 0.5) / size * 2 - 1                                  # pixel -> normalised (align_corners=False)
    u_out = torch.linalg.solve(a, (u_in - shift[:, None]).transpose(1, 2)).transpose(1, 2)
    lm = (u_out + 1) / 2 * size - 0.5
    vis = vis & ((lm >= -0.5) & (lm <= size - 0.5)).all(-1)
    # light: gain, colour, gamma, offset -- on [0, 1] intensities
    u = ((x + 1) / 2).clamp(0, 1)
    u = u ** (0.7 + 0.7 * rand(b, 1, 1, 1))
    u = u * (0.7 + 0.6 * rand(b, 1, 1, 1)) * (0.85 + 0.3 * rand(b, 3, 1, 1)) + 0.15 * (rand(b, 1, 1, 1) * 2 - 1)
    x = u * 2 - 1
    # blur (generated images are soft) and noise
    sigma = torch.where(rand(b) < 0.6, rand(b) * 1.2 * (w / 32), torch.zeros(b, device=dev))
    x = _blur(x, sigma)
    x = x + torch.where(rand(b, 1, 1, 1) < 0.5, 0.06 * rand(b, 1, 1, 1), torch.zeros(b, 1, 1, 1, device=dev)) \
        * torch.randn(x.shape, generator=generator).to(dev)
    return x.clamp(-1, 1).to(dt), fg, lm, vis, pose


def probe_loss(net: GeometryProbeNet, images: Tensor, fg: Tensor, landmarks: Tensor, visible: Tensor, pose: Tensor,
               occluded_weight: float = 0.3) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and its parts for one batch of views at any resolution (labels in its pixels)."""
    logits, heatmaps, pred_pose = net(images)
    s, size = net.input_size, images.shape[-1]
    if fg.shape[-1] != s:
        fg = F.interpolate(fg.float(), size=(s, s), mode="area")
    lm = (landmarks.float() + 0.5) * (s / size) - 0.5 if size != s else landmarks.float()
    mask_loss = F.binary_cross_entropy_with_logits(logits, fg.float())
    pred_lm = net.soft_argmax(heatmaps)
    inside = ((lm >= -0.5) & (lm <= s - 0.5)).all(-1)
    weight = torch.where(visible.bool(), 1.0, torch.where(inside, occluded_weight, 0.0))
    lm_loss = ((pred_lm - lm).abs().sum(-1) * weight).sum() / weight.sum().clamp_min(1)
    pose_loss = (pred_pose - pose[:, :2].float()).abs().mean() / 10
    total = mask_loss + 0.5 * lm_loss + pose_loss
    return total, {"mask": mask_loss.detach(), "landmarks_px": lm_loss.detach(), "pose_10deg": pose_loss.detach()}


class ProbeTask(L.LightningModule):
    """Flat kwargs (config node ``model``); ``optimizer`` is a ``_partial_`` optimizer factory."""

    def __init__(
        self,
        landmarks: int = 12,
        width: int = 16,
        depth: int = 3,
        input_size: int = 32,
        augment: bool = True,
        occluded_weight: float = 0.3,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        export_name: str = "probe.pt",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.net = GeometryProbeNet(landmarks=landmarks, width=width, depth=depth, input_size=input_size)
        self.optimizer_factory = optimizer
        self._val: list[dict] = []

    def _fields(self, batch: dict) -> tuple[Tensor, ...]:
        missing = [k for k in NEEDS if k not in batch]
        if missing:
            raise DataError(f"the geometry probe needs synthetic ground truth per view; the batch lacks {missing} "
                            "(train it on `icp shards synth` shards with data.images_only=true)")
        lm = batch[K.PROFILE_LANDMARKS]
        if lm.shape[1] != self.hparams.landmarks:
            raise DataError(f"the shards have {lm.shape[1]} landmarks per view, model.landmarks={self.hparams.landmarks}")
        vis = batch.get(K.PROFILE_LANDMARKS_VISIBLE, torch.ones(lm.shape[:2], dtype=torch.bool, device=lm.device))
        return batch[K.PROFILE], batch[K.PROFILE_FG], lm, vis, batch[K.PROFILE_POSE]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        fields = self._fields(batch)
        if self.hparams.augment:
            fields = augment(*fields)
        loss, parts = probe_loss(self.net, *fields, occluded_weight=self.hparams.occluded_weight)
        self.log_dict({"train/loss": loss, **{f"train/{k}": v for k, v in parts.items()}}, prog_bar=True,
                      batch_size=len(fields[0]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._fields(batch)
        self._val.append({k: v.detach() for k, v in batch.items() if isinstance(v, Tensor)})

    def on_validation_epoch_end(self) -> None:
        if self._val:
            rel = G.probe_reliability(self.net.read, self._val, role="profile")
            for name in ("landmark_err", "landmark_err_px", "yaw_err", "pitch_err", "silhouette_iou"):
                # per-rank values of a split val set: Lightning averages them across ranks
                self.log(f"val/{name}", float(rel[name]), sync_dist=self.trainer.world_size > 1)
        self._val.clear()
        self.export_to_run_dir()

    def on_train_end(self) -> None:
        self.export_to_run_dir()

    def export_to_run_dir(self) -> Path | None:
        if self.trainer is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return None
        path = Path(self.trainer.default_root_dir) / self.hparams.export_name
        return export(self.net, path, meta={"step": int(self.global_step), "label": "icp-geometry-probe"})

    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4))
        return factory(self.parameters())
