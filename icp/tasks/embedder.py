"""EmbedderTask: trains the identity embedder the synthetic benchmark measures identity with.

Batches are single views (``ShardDataModule(images_only=True)``: PROFILE + IDENTITY). The loss is
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


def augment(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Cheap photometric + geometric jitter so the metric tolerates small generation drift."""
    b = images.shape[0]
    dev = images.device
    gain = 1 + 0.2 * (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1)
    bias = 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1)
    x = images * gain.to(dev) + bias.to(dev)
    # random shift/scale by up to ~6% through an affine grid
    theta = torch.zeros(b, 2, 3)
    scale = 1 + 0.06 * (torch.rand(b, generator=generator) * 2 - 1)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = 0.06 * (torch.rand(b, 2, generator=generator) * 2 - 1)
    grid = F.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False).clamp(-1, 1)


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

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        labels = self._labels(batch)
        images = augment(batch[K.PROFILE]) if self.hparams.augment else batch[K.PROFILE]
        logits = self.head(self.net(images), labels)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val.append((self.net(batch[K.PROFILE]).detach(), batch[K.IDENTITY].long()))

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
        return export(self.net, path, meta={"step": int(self.global_step), "label": "icp-synthetic-embedder"})

    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=5e-4))
        return factory(self.parameters())
