"""A callback that writes sample grids during training: profile | masked target | generated | truth.

Every ``every_n_steps`` optimizer steps it calls the task's ``sample()`` on a fixed batch (the
first training batch it sees, cut to ``num_samples``) with a fixed seed, so grids of successive
steps are directly comparable. The labelled PNG (icp.eval.grids) goes to ``<run dir>/samples/``
and, when a W&B logger is attached, the same uint8 pixels to W&B.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from icp.data import keys as K
from icp.eval.grids import grid

COLUMNS = ("profile", "masked target", "generated", "ground truth")


def grid_image(batch: dict, generated: torch.Tensor):
    """One row per sample, the four COLUMNS, labelled; a uint8 PIL image."""
    images = [batch[K.PROFILE], batch[K.TARGET_MASKED], generated, batch.get(K.TARGET, torch.zeros_like(generated))]
    return grid(list(zip(COLUMNS, images)))


def _head(batch: dict, n: int) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[:n].detach().clone()
        elif isinstance(value, (list, tuple)):
            out[key] = list(value[:n])
    return out


class SampleGrid(L.Callback):
    def __init__(self, every_n_steps: int = 500, num_samples: int = 4, num_steps: int = 20,
                 guidance_scale: float | None = None, seed: int = 0, on_train_end: bool = True):
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.at_train_end = on_train_end
        self._batch: dict | None = None
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch is None:
            self._batch = _head(batch, self.num_samples)
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end:
            self.write(trainer, pl_module)

    def write(self, trainer, pl_module) -> Path | None:
        step = trainer.global_step
        if self._batch is None or step == self._last_step or not trainer.is_global_zero:
            return None
        self._last_step = step
        batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in self._batch.items()}
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        images = pl_module.sample(batch, num_steps=self.num_steps, guidance_scale=self.guidance_scale,
                                  generator=generator)
        image = grid_image(batch, images)
        path = Path(trainer.default_root_dir) / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[image], step=step, caption=[" | ".join(COLUMNS)])
        return path
