"""EmbedderTask: trains the identity embedder the synthetic benchmark measures identity with.

Batches are single views (``ShardDataModule(images_only=True)``: PROFILE, PROFILE_FG (the head mask),
IDENTITY, pose, light). With ``head_only`` (the default) the network sees the head alone -- the
background replaced as the evaluator replaces it (``icp.data.masking.head_only``), randomised in
training (``augment``: light, blur, background) -- because the evaluator scores identity on the head
only (docs/decisions/eval.md). The loss is
ArcFace's additive angular margin (Deng et al. 2019): logits s*cos(theta_y + m) for the true
identity, s*cos(theta_j) for the others, so embeddings of one identity cluster on the sphere
with a margin -- across the poses and lightings the renderer varies, which is what makes it an
identity (not appearance) metric. Validation is verification on held-out identities (never seen
in training): ROC AUC and best-threshold accuracy of same/different pairs.

The trained network is exported to ``<run dir>/embedder.pt`` (icp.models.embedder.export)
after every validation and at the end of training; ``icp eval`` loads that file (or the .ckpt).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icp.data import keys as K
from icp.data.masking import head_only
from icp.core.errors import ConfigError, DataError
from icp.models.embedder import IdentityEmbedderNet, export


class ArcMarginHead(nn.Module):
    """Class-centre weights and the additive angular margin logits (ArcFace eq. 3)."""

    def __init__(self, dim: int, classes: int, scale: float = 30.0, margin: float = 0.3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1)).clamp(-1 + 1e-7, 1 - 1e-7)
        theta_y = torch.acos(cos.gather(1, labels[:, None]))
        # Past pi - m the margin would wrap around; fall back to CosFace's linear penalty there.
        with_margin = torch.where(theta_y + self.margin < math.pi, torch.cos(theta_y + self.margin),
                                  cos.gather(1, labels[:, None]) - self.margin * math.sin(self.margin))
        logits = cos.scatter(1, labels[:, None], with_margin)
        return logits * self.scale


def gaussian_blur(images: Tensor, sigma: Tensor | float) -> Tensor:
    """Blur each image by its own Gaussian ``sigma`` (pixels; (B,) or a float; 0 = unchanged),
    separable, reflect padding so a flat image stays flat."""
    b = images.shape[0]
    sigma = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).expand(b)
    radius = max(1, int(math.ceil(3 * float(sigma.max())))) if float(sigma.max()) > 0 else 0
    if radius == 0:
        return images
    radius = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (x[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)                                    # (B, 2r+1); sigma ~0 -> delta
    c = images.shape[1]
    kernel = k.repeat_interleave(c, 0)                                # one kernel per (image, channel)
    x = images.reshape(1, b * c, *images.shape[-2:])
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return x.reshape(images.shape)


def augment(images: Tensor, fg: Tensor | None = None, generator: torch.Generator | None = None,
            blur_sigma: float = 2.0, light: float = 0.25, background_noise: float = 0.15) -> Tensor:
    """Train-time jitter for an identity (not appearance) embedder. Pose varies across the renders
    already; on top of it:

    * light: per-channel gain (light colour and intensity), a brightness offset, and a linear
      shading ramp in a random direction (a light from another side), each of size ~``light``;
    * geometry: shift/scale by up to ~6 %;
    * blur: Gaussian sigma uniform in [0, ``blur_sigma``] px at 32 px (scaled with the image size),
      on half the images;
    * background: with ``fg`` (the head mask) the output depends on the head pixels only: the head is
      cut out (mid-grey around it) before the shift and blur, and the background finally becomes
      mid-grey (0, the evaluator's fill) for half the images and a random grey/colour plus pixel
      noise for the rest, so the network can key neither on the background nor on the fill.
    """
    b, _, h, w = images.shape
    dev, dt = images.device, images.dtype

    def u(*shape):  # uniform in [-1, 1], drawn on the CPU generator (reproducible on any device)
        return (torch.rand(*shape, generator=generator) * 2 - 1).to(dev, dt)

    gain = 1 + light * (0.8 * u(b, 1, 1, 1) + 0.4 * u(b, 3, 1, 1))
    bias = 0.4 * light * u(b, 1, 1, 1)
    angle = math.pi * u(b)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=dev, dtype=dt),
                            torch.linspace(-1, 1, w, device=dev, dtype=dt), indexing="ij")
    ramp = (xs * angle.cos()[:, None, None] + ys * angle.sin()[:, None, None])[:, None]
    slope = light * (torch.rand(b, 1, 1, 1, generator=generator).to(dev, dt))
    x = ((images + 1) * gain * (1 + slope * ramp) - 1 + bias).clamp(-1, 1)
    if fg is not None:  # the head alone from here on: shifting and blurring cannot pull background in
        x = head_only(x, fg)
    # random shift/scale by up to ~6% through an affine grid (the mask moves with the image)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=dt)
    scale = 1 + 0.06 * u(b)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = 0.06 * u(b, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    if blur_sigma > 0:
        sigma = blur_sigma * h / 32 * torch.rand(b, generator=generator).to(dev, dt)
        sigma = sigma * (torch.rand(b, generator=generator) < 0.5).to(dev, dt)
        x = gaussian_blur(x, sigma)
    if fg is not None:
        fg = F.grid_sample(fg.to(dev, dt), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        plain = (torch.rand(b, 1, 1, 1, generator=generator) < 0.5).to(dev, dt)
        colour = 0.6 * (0.7 * u(b, 1, 1, 1) + 0.3 * u(b, 3, 1, 1))
        noise = background_noise * torch.rand(b, 1, 1, 1, generator=generator).to(dev, dt) * u(b, 3, h, w)
        x = head_only(x, fg, fill=(1 - plain) * (colour + noise))
    return x.clamp(-1, 1)


def verification(emb: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """ROC AUC and best-threshold accuracy of all same/different pairs of embeddings."""
    from torchmetrics.functional.classification import binary_auroc

    sims = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    scores, targets = sims[upper], same[upper].long()
    if targets.sum() == 0 or targets.sum() == len(targets):
        return {}
    order = torch.argsort(scores, descending=True)
    t = targets[order].float()
    # accuracy of thresholding just below each score: TP(k) + TN(k) over all pairs
    tp = torch.cumsum(t, 0)
    tn = (1 - t).sum() - torch.cumsum(1 - t, 0)
    best = ((tp + tn) / len(t)).max()
    return {"verif_auc": binary_auroc(scores, targets), "verif_acc": best}


class EmbedderTask(L.LightningModule):
    """Flat kwargs (config node ``model``); ``optimizer`` is a ``_partial_`` optimizer factory."""

    def __init__(
        self,
        num_identities: int,
        dim: int = 128,
        width: int = 32,
        depth: int = 4,
        input_size: int = 64,
        margin: float = 0.3,
        scale: float = 30.0,
        augment: bool = True,
        head_only: bool = True,
        blur_sigma: float = 2.0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        export_name: str = "embedder.pt",
    ):
        super().__init__()
        if num_identities < 2:
            raise ConfigError(f"model.num_identities={num_identities}: the margin loss needs at least 2 identities")
        self.save_hyperparameters(ignore=["optimizer"])
        self.net = IdentityEmbedderNet(dim=dim, width=width, depth=depth, input_size=input_size)
        self.head = ArcMarginHead(dim, num_identities, scale=scale, margin=margin)
        self.optimizer_factory = optimizer
        self._val: list[tuple[Tensor, Tensor]] = []

    def _labels(self, batch: dict) -> Tensor:
        labels = batch[K.IDENTITY].long()
        if labels.max() >= self.hparams.num_identities or labels.min() < 0:
            raise DataError(f"identity index {int(labels.max())} is outside model.num_identities="
                            f"{self.hparams.num_identities}; set it to the training shards' identity count")
        return labels

    def _fg(self, batch: dict) -> Tensor | None:
        if not self.hparams.head_only:
            return None
        if K.PROFILE_FG not in batch:
            raise DataError(f"model.head_only=true needs the head mask ({K.PROFILE_FG}) in every batch; these "
                            "shards have no fg masks (set model.head_only=false to train on whole images)")
        return batch[K.PROFILE_FG]

    def inputs(self, batch: dict) -> Tensor:
        """What the network sees at validation and in the evaluator: the head on mid-grey (or the whole view)."""
        fg = self._fg(batch)
        return batch[K.PROFILE] if fg is None else head_only(batch[K.PROFILE], fg)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        labels = self._labels(batch)
        if self.hparams.augment:
            images = augment(batch[K.PROFILE], self._fg(batch), blur_sigma=self.hparams.blur_sigma)
        else:
            images = self.inputs(batch)
        logits = self.head(self.net(images), labels)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val.append((self.net(self.inputs(batch)).detach(), batch[K.IDENTITY].long()))

    def on_validation_epoch_end(self) -> None:
        if self._val:
            emb = torch.cat([e for e, _ in self._val])
            labels = torch.cat([lab for _, lab in self._val])
            if self.trainer.world_size > 1:  # val samples are split evenly across ranks: gather all
                emb = self.all_gather(emb).flatten(0, 1)
                labels = self.all_gather(labels).flatten(0, 1)
            for name, value in verification(emb.float(), labels).items():
                self.log(f"val/{name}", value.float())  # same value on every rank (gathered)
        self._val.clear()
        self.export_to_run_dir()

    def on_train_end(self) -> None:
        self.export_to_run_dir()

    def export_to_run_dir(self) -> Path | None:
        if self.trainer is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return None
        path = Path(self.trainer.default_root_dir) / self.hparams.export_name
        return export(self.net, path, meta={"step": int(self.global_step), "label": "icp-synthetic-embedder",
                                                "input": "head only" if self.hparams.head_only else "whole image"})

    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=5e-4))
        return factory(self.parameters())
