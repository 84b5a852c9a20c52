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
    """CUDA-event marks at each timed batch start; then, optionally, ``profile_steps`` more steps
    of the same loop under torch.profiler (the whole Lightning step: optimizer, hooks, gaps)."""

    def __init__(self, device: torch.device, warmup: int, iters: int, profile_steps: int = 0):
        self.clock = StepClock(device)
        self.warmup, self.iters, self.profile_steps = warmup, iters, profile_steps
        self.started = self.warmup_s = float("nan")
        self.profile: str | None = None
        self.timing: dict[str, float] | None = None  # the timed steps, once they are over
        self._prof = None
        self._prof_started = 0.0

    def on_train_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            # Host time of the warm-up steps: torch.compile happens in the first of them.
            common.sync(self.clock.device)
            self.warmup_s = time.perf_counter() - self.started
        if self.warmup <= batch_idx <= self.warmup + self.iters:
            self.clock.mark()  # the mark at warmup + iters closes the last timed step
        if self.profile_steps and batch_idx == self.warmup + self.iters:
            # The timed steps are kept before profiling starts: a profiler fault must not lose them.
            self.timing = summarize(self.clock.deltas_ms())
            from torch.profiler import profile

            from .report import profiler_activities

            cuda = self.clock.device.type == "cuda"
            self._prof = profile(activities=profiler_activities(self.clock.device), record_shapes=cuda)
            self._prof.__enter__()
            self._prof_started = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if self._prof is None:
            self.clock.mark()
            self.timing = summarize(self.clock.deltas_ms())
            return
        common.sync(self.clock.device)
        wall_ms = (time.perf_counter() - self._prof_started) * 1e3 / self.profile_steps
        self._prof.__exit__(None, None, None)
        from .report import profile_summary

        self.profile = profile_summary(self._prof, self.clock.device, self.profile_steps, wall_ms, self.timing["ms"])
        self._prof = None

    def profile_failed(self, err: Exception) -> None:
        """A step after the timed ones raised: close the profiler, say why in place of its table."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
        self.profile = f"profile failed: {common.error_line(err)}"


def fit_and_time(task: L.LightningModule, batch: dict, device: torch.device, warmup: int, iters: int,
                 precision: str = "bf16-mixed", profile_steps: int = 0) -> dict[str, Any]:
    """Train ``warmup + iters`` steps with a real Trainer; returns their timing. ``profile_steps``:
    that many more steps of the same loop under torch.profiler (``out["profile"]``, its table)."""
    timer = StepTimer(device, warmup, iters, profile_steps)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
        max_steps=warmup + iters + profile_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer],
    )
    loader = DataLoader(_Repeat(batch), batch_size=None, num_workers=0)
    try:
        trainer.fit(task, train_dataloaders=loader)
    except Exception as err:  # noqa: BLE001 -- a fault in the profiled steps keeps the timed ones
        if timer.timing is None:
            raise
        timer.profile_failed(err)
    out = dict(timer.timing)
    out["first_steps_s"] = timer.warmup_s  # the warm-up steps, compilation included
    out["optimizer_fused"] = bool(trainer.optimizers[0].defaults.get("fused"))
    if timer.profile is not None:
        out["profile"] = timer.profile
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


def batch_head(batch: dict, n: int) -> dict:
    """The first ``n`` samples of a batch dict (tensors sliced, anything else as it is)."""
    return {k: v[:n] if torch.is_tensor(v) else v for k, v in batch.items()}


def free(*objs, recompile: bool = False) -> None:
    """Release a row's memory before the next. ``recompile``: the row recorded inductor's CUDA
    graphs, so dynamo's compiled code is dropped too (the next row compiles again, from inductor's
    on-disk caches)."""
    del objs
    gc.collect()
    if torch.cuda.is_available():
        # Inductor's CUDA graphs (compile: reduce-overhead) keep their memory pools in a
        # process-wide tree: without a reset the next row runs beside them (H200: a batch-96 row
        # OOMed beside the 52 GiB left by a batch-64 reduce-overhead row).
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
        if recompile:
            # Dynamo's cached code calls into the tree just shut down: a row reusing it failed
            # with "Running CUDAGraph after shutdown" (H100, round 7).
            torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()


def manual_step(task, batch: dict, device: torch.device) -> None:
    """One loss + backward of a task outside Lightning (for the profiler only)."""
    task.to(device).train()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = task.losses(batch)["loss"]
    loss.backward()
    task.zero_grad(set_to_none=True)
