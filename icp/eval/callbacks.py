"""In-loop evaluation: every N steps, generate the held-out set with the task's ``sample()`` and
score it (icp.eval.evaluator), on all ranks.

Each rank generates its own slice of the held-out set (sample i on rank i % world, see
icp/eval/heldout.py), metric states reduce across ranks, and per-sample rows are gathered, so
every sample is evaluated exactly once. Rank 0 then logs
- scalars ``eval/<metric>`` to every logger of the trainer (CSV and W&B alike),
- an image grid (profile | masked target | generated | truth) to ``<run dir>/samples/`` and W&B,
- a per-identity table to ``<run dir>/eval/identities_step<N>.csv`` and W&B,
- ``<run dir>/eval/latest.json`` (scalars + extractors + unavailable metrics).
Evaluation reaches the task ONLY through ``sample(batch, num_steps, guidance_scale, generator)``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Callable, Iterable

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from torchvision.utils import make_grid, save_image

from icp.data import keys as K
from icp.eval.evaluator import Evaluator, build_extractors, per_identity
from icp.eval.heldout import heldout_loader, take


def grid(batch: dict, generated: torch.Tensor, n: int) -> torch.Tensor:
    """(3, H', W') in [0, 1]: one row per sample, columns profile | masked target | generated | truth."""
    cols = [batch[K.PROFILE], batch.get(K.TARGET_MASKED, torch.zeros_like(generated)), generated,
            batch.get(K.TARGET, torch.zeros_like(generated))]
    tiles = torch.stack([c[:n].detach().float().cpu() for c in cols], 1).flatten(0, 1)
    return make_grid((tiles.clamp(-1, 1) + 1) / 2, nrow=len(cols), padding=2, pad_value=1.0)


def gather_rows(rows: list[dict]) -> list[dict]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, rows)
        return [r for part in parts for r in part]
    return rows


def evaluate(sample: Callable, batches: Iterable[dict], evaluator: Evaluator, device: torch.device,
             num_steps: int = 20, guidance_scale: float | None = None, seed: int = 0,
             grid_samples: int = 0) -> tuple[dict, list[dict], torch.Tensor | None]:
    """Generate and score ``batches`` (this rank's slice); return (scalars over all ranks,
    per-sample rows of all ranks, this rank's image grid or None). Every rank must call it."""
    evaluator.reset()
    rows, grid_img = [], None
    for batch in batches:
        batch = move_data_to_device(batch, device)
        # Seeded by the batch's first identity, not the step or rank: same noise every evaluation.
        first = int(batch[K.IDENTITY][0]) if K.IDENTITY in batch else 0
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + first)
        outputs = sample(batch, num_steps=num_steps, guidance_scale=guidance_scale, generator=generator)
        rows += evaluator.update(outputs, batch)
        if grid_img is None and grid_samples > 0:
            grid_img = grid(batch, outputs, grid_samples)
    scalars = evaluator.compute()
    return scalars, gather_rows(rows), grid_img


class EvalCallback(L.Callback):
    """Flat kwargs for the ``callbacks.eval`` config node (see experiments/ and eval/protocol.yaml).

    Args:
        every_n_steps: evaluate after every this many optimizer steps (and at the end of training).
        shards: held-out shard folder; None = the datamodule's validation loader.
        num_samples: held-out pairs per evaluation, over all ranks.
        identity: identity extractors to use, of "icp", "dlib", "facenet".
        embedder / dlib_models_dir / facenet_weights / inception_torchscript / clip_model: local
            weights (eval.* options); a metric whose weights are absent is reported unavailable.
    """

    def __init__(self, every_n_steps: int = 1000, shards: str | None = None, num_samples: int = 32,
                 batch_size: int = 8, resolution: int | None = None, mask_ratio: float | None = None,
                 patch_size: int | None = None, seed: int = 0, num_steps: int = 20,
                 guidance_scale: float | None = None, identity: list[str] | str = ("icp", "dlib"),
                 embedder: str | None = None, dlib_models_dir: str | None = None, facenet_weights: str | None = None,
                 fid: bool = True, inception_torchscript: str | None = None, clip_model: str | None = None,
                 kid_subset_size: int = 100, grid_samples: int = 8, at_train_end: bool = True,
                 prefix: str = "eval"):
        self.every_n_steps, self.shards, self.num_samples = every_n_steps, shards, num_samples
        self.batch_size, self.resolution, self.mask_ratio, self.patch_size = batch_size, resolution, mask_ratio, patch_size
        self.seed, self.num_steps, self.guidance_scale = seed, num_steps, guidance_scale
        self.extractor_kwargs = dict(identity=list(identity) if not isinstance(identity, str) else identity,
                                     embedder=embedder, dlib_models_dir=dlib_models_dir,
                                     facenet_weights=facenet_weights, fid=fid,
                                     inception_torchscript=inception_torchscript, clip_model=clip_model)
        self.kid_subset_size, self.grid_samples = kid_subset_size, grid_samples
        self.at_train_end, self.prefix = at_train_end, prefix
        self.evaluator: Evaluator | None = None
        self._last_step = -1

    # -- hooks
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    # -- the evaluation
    def _batches(self, trainer: L.Trainer) -> Iterable[dict]:
        per_rank = max(1, self.num_samples // max(1, trainer.world_size))
        dm = trainer.datamodule
        if self.shards is None:
            if dm is None or not hasattr(dm, "val_dataloader"):
                from icp.core.errors import ConfigError

                raise ConfigError("callbacks.eval: set shards (a held-out shard folder) or give the datamodule val_shards")
            return take(dm.val_dataloader(), per_rank)

        def pick(name, default):
            mine = getattr(self, name)
            return mine if mine is not None else getattr(dm, name, default)

        loader = heldout_loader(self.shards, resolution=pick("resolution", None), mask_ratio=pick("mask_ratio", 0.8),
                                patch_size=pick("patch_size", 8), seed=self.seed, batch_size=self.batch_size)
        return take(loader, per_rank)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        self._last_step = step = trainer.global_step
        if self.evaluator is None:
            self.evaluator = Evaluator(build_extractors(device=pl_module.device, **self.extractor_kwargs),
                                       kid_subset_size=self.kid_subset_size)
        self.evaluator.to(pl_module.device)
        with torch.no_grad():
            scalars, rows, grid_img = evaluate(pl_module.sample, self._batches(trainer), self.evaluator,
                                               pl_module.device, self.num_steps, self.guidance_scale, self.seed,
                                               self.grid_samples if trainer.is_global_zero else 0)
        if trainer.is_global_zero:
            self._write(trainer, step, scalars, rows, grid_img)
        return scalars

    def _write(self, trainer: L.Trainer, step: int, scalars: dict, rows: list[dict], grid_img) -> None:
        root = Path(trainer.default_root_dir)
        logged = {f"{self.prefix}/{k}": v for k, v in scalars.items()}
        logged[f"{self.prefix}/samples"] = float(len(rows))
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        out = root / "eval"
        out.mkdir(parents=True, exist_ok=True)
        columns, table = per_identity(rows)
        with open(out / f"identities_step{step:07d}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(table)
        record = {"step": step, "samples": len(rows), "metrics": scalars,
                  "extractors": self.evaluator.extractors.describe(),
                  "unavailable": self.evaluator.extractors.unavailable, "no_valid_samples": self.evaluator.empty}
        (out / "latest.json").write_text(json.dumps(record, indent=2, allow_nan=True))
        png = None
        if grid_img is not None:
            (root / "samples").mkdir(parents=True, exist_ok=True)
            png = root / "samples" / f"eval_step{step:07d}.png"
            save_image(grid_img, png)
        self._to_wandb(trainer, step, columns, table, png)

    def _to_wandb(self, trainer: L.Trainer, step: int, columns, table, png) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                if png is not None:
                    logger.log_image(f"{self.prefix}/grid", images=[str(png)], step=step,
                                     caption=["profile | masked target | generated | truth"])
                clean = [[None if isinstance(v, float) and math.isnan(v) else v for v in r] for r in table]
                logger.log_table(f"{self.prefix}/identities", columns=columns, data=clean, step=step)
