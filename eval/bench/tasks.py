"""(b)-(d) through icp itself: the tasks trained by a real ``lightning.Trainer``, and ``task.sample``.

The timed loop is Lightning's own (automatic optimisation, precision plugin, hooks); a callback
marks every batch start with a CUDA event and counts the FLOPs of one warm-up step.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.flop_counter import FlopCounterMode

from icp.data import keys as K
from icp.tasks.base import DiffusionTask

from . import common
from .common import StepClock, summarize


class LatentCodec(nn.Module):
    """A codec whose "images" already are latents: isolates the denoising step for (b).

    (a) trains on given latents, as the issue's reference does; (b) must do the same work.
    """

    def __init__(self, latent_channels: int = 4, downscale: int = 8):
        super().__init__()
        self.latent_channels, self.downscale = latent_channels, downscale

    def encode(self, images, sample: bool = False, generator=None):
        return images

    def decode(self, latents):
        return latents


class DenoiseTask(DiffusionTask):
    """DiffusionTask with no control net: the plain denoising step of (a), through icp's task."""

    def prepare_condition(self, batch: dict) -> None:
        return None

    def condition(self, state, noisy_latents, timesteps, text_states):
        # An empty skip list and a broadcastable zero "mid": DiffusionTask.losses applies the CFG
        # mask to them, and unet() below drops them, so the UNet runs exactly as in (a).
        return (), noisy_latents.new_zeros(1, 1, 1, 1)

    def unet(self, latents, timesteps, text_states, residuals=None):
        if residuals is not None and len(residuals[0]) == 0:
            residuals = None
        return super().unet(latents, timesteps, text_states, residuals)


class _Repeat(IterableDataset):
    """The same (device-resident) batch forever: the benchmark times compute, not data."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class StepTimer(L.Callback):
    def __init__(self, device: torch.device, warmup: int, flop_step: int = 1):
        self.clock = StepClock(device)
        self.warmup, self.flop_step = warmup, flop_step
        self.flops = float("nan")
        self.started = self.warmup_s = float("nan")
        self._counter: FlopCounterMode | None = None

    def on_train_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            # Host time of the warm-up steps: torch.compile happens in the first of them.
            common.sync(self.clock.device)
            self.warmup_s = time.perf_counter() - self.started
        if batch_idx == self.flop_step:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        if batch_idx >= self.warmup:
            self.clock.mark()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops = float(self._counter.get_total_flops())
            self._counter = None

    def on_train_end(self, trainer, pl_module):
        self.clock.mark()


def fit_and_time(task: L.LightningModule, batch: dict, device: torch.device, warmup: int, iters: int,
                 precision: str = "bf16-mixed") -> dict[str, Any]:
    """Train ``warmup + iters`` steps with a real Trainer; returns timing and FLOPs per step."""
    timer = StepTimer(device, warmup, flop_step=-1)  # FLOPs are counted eagerly by the caller
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
        max_steps=warmup + iters, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
    )
    loader = DataLoader(_Repeat(batch), batch_size=None, num_workers=0)
    trainer.fit(task, train_dataloaders=loader)
    out = summarize(timer.clock.deltas_ms())
    out["flops"] = timer.flops
    out["first_steps_s"] = timer.warmup_s  # the warm-up steps, compilation included
    out["optimizer_fused"] = bool(trainer.optimizers[0].defaults.get("fused"))
    del trainer
    return out


def image_batch(batch: int, channels: int, hw: tuple[int, int], device: torch.device, seed: int = 0) -> dict:
    """A batch following icp/data/keys.py (images in [-1, 1], keep-mask for the masked target)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {name: torch.rand(batch, channels, *hw, device=device, generator=gen) * 2 - 1
           for name in (K.PROFILE, K.TARGET)}
    keep = (torch.rand(batch, 1, *hw, device=device, generator=gen) > 0.8).float()
    out[K.TARGET_MASKED] = out[K.TARGET] * keep
    out[K.TARGET_KEEP] = keep
    return out


def free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def manual_step(task, batch: dict, device: torch.device) -> None:
    """One loss + backward of a task outside Lightning (for the profiler only)."""
    task.to(device).train()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = task.losses(batch)["loss"]
    loss.backward()
    task.zero_grad(set_to_none=True)
