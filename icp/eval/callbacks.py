"""In-loop evaluation: every N steps, the one paired evaluation (icp.eval.paired) of the held-out
set with the task's ``sample()``, on all ranks.

Each rank generates its own slice of the held-out set (sample i on rank i % world, see
icp/eval/heldout.py), metric states reduce across ranks, and per-sample rows are gathered, so
every sample is evaluated exactly once. Rank 0 then logs
- scalars ``eval/<metric>`` and, per baseline, ``eval/<metric>@<baseline>`` and the paired
  difference ``eval/<metric>-<baseline>`` to every logger of the trainer (CSV and W&B alike),
- a labelled image grid (profile | masked target | generated | baselines | truth) to
  ``<run dir>/samples/`` and W&B (as uint8 pixels),
- a per-identity table to ``<run dir>/eval/identities_step<N>.csv`` and W&B,
- ``<run dir>/eval/latest.json`` (scalars, intervals, comparisons, extractors, unavailable metrics).
Evaluation reaches the task ONLY through ``sample(batch, num_steps, guidance_scale, generator)``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

import lightning as L

from icp.eval import baselines as B
from icp.eval.evaluator import Evaluator, build_extractors, per_identity
from icp.eval.grids import grid
from icp.eval.heldout import heldout_loader, interleaved
from icp.eval.paired import METHOD, PairedResult, evaluate_pairs


class EvalCallback(L.Callback):
    """Flat kwargs for the ``callbacks.eval`` config node (see experiments/ and eval/protocol.yaml).

    Args:
        every_n_steps: evaluate after every this many optimizer steps (and at the end of training).
        shards: held-out shard folder; None = the datamodule's validation loader.
        num_samples: held-out pairs per evaluation, over all ranks.
        identity: identity extractors to use, of "icp", "dlib", "facenet".
        baselines: baselines generated beside the method (icp.eval.baselines; default: another identity's
            profile, which doubles the sampling cost; [] for none).
        probe: a geometry probe (probe.pt) for the view-consistency metrics (landmark, yaw, pitch, silhouette).
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
                 prefix: str = "eval", baselines: list[str] | tuple[str, ...] = ("other_identity",),
                 probe: str | None = None):
        self.every_n_steps, self.shards, self.num_samples = every_n_steps, shards, num_samples
        self.batch_size, self.resolution, self.mask_ratio, self.patch_size = batch_size, resolution, mask_ratio, patch_size
        self.seed, self.num_steps, self.guidance_scale = seed, num_steps, guidance_scale
        self.extractor_kwargs = dict(identity=list(identity) if not isinstance(identity, str) else identity,
                                     embedder=embedder, dlib_models_dir=dlib_models_dir,
                                     facenet_weights=facenet_weights, fid=fid,
                                     inception_torchscript=inception_torchscript, clip_model=clip_model,
                                     probe=probe)
        self.kid_subset_size, self.grid_samples = kid_subset_size, grid_samples
        self.at_train_end, self.prefix = at_train_end, prefix
        self.baselines = B.resolve(list(baselines))
        self.evaluators: dict[str, Evaluator] = {}
        self.extractors = None
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
            return interleaved(dm.val_dataloader(), per_rank, self.batch_size)

        def pick(name, default):
            mine = getattr(self, name)
            return mine if mine is not None else getattr(dm, name, default)

        loader = heldout_loader(self.shards, resolution=pick("resolution", None), mask_ratio=pick("mask_ratio", 0.8),
                                patch_size=pick("patch_size", 8), seed=self.seed, batch_size=self.batch_size)
        return interleaved(loader, per_rank, self.batch_size)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        self._last_step = step = trainer.global_step
        if self.extractors is None:
            self.extractors = build_extractors(device=pl_module.device, **self.extractor_kwargs)
        result = evaluate_pairs(pl_module.sample, self._batches(trainer), self.extractors, pl_module.device,
                                baselines=self.baselines, num_steps=self.num_steps,
                                guidance_scale=self.guidance_scale, seed=self.seed,
                                grid_samples=self.grid_samples if trainer.is_global_zero else 0,
                                kid_subset_size=self.kid_subset_size, evaluators=self.evaluators)
        if trainer.is_global_zero:
            self._write(trainer, step, result)
        return result.scalars[METHOD]

    def _write(self, trainer: L.Trainer, step: int, result: PairedResult) -> None:
        root = Path(trainer.default_root_dir)
        scalars = result.scalars[METHOD]
        logged = {f"{self.prefix}/{k}": v for k, v in scalars.items()}
        for arm, values in result.scalars.items():
            if arm != METHOD:
                logged.update({f"{self.prefix}/{k}@{arm}": v for k, v in values.items()})
        for arm, found in result.comparisons.items():
            logged.update({f"{self.prefix}/{k}-{arm}": c["mean"] for k, c in found.items() if c["n"]})
        logged[f"{self.prefix}/samples"] = float(result.samples)
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        out = root / "eval"
        out.mkdir(parents=True, exist_ok=True)
        columns, table = per_identity(result.rows[METHOD])
        with open(out / f"identities_step{step:07d}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(table)
        record = {"step": step, "samples": result.samples, "metrics": scalars, "baselines": {
                      a: v for a, v in result.scalars.items() if a != METHOD},
                  "intervals": result.intervals, "comparisons": result.comparisons,
                  "extractors": self.extractors.describe(), "unavailable": self.extractors.unavailable,
                  "no_valid_samples": result.empty[METHOD]}
        (out / "latest.json").write_text(json.dumps(record, indent=2, allow_nan=True))
        image = None
        if result.grid_columns:
            (root / "samples").mkdir(parents=True, exist_ok=True)
            image = grid(result.grid_columns, row_labels=[f"id {i}" for i in result.grid_identities])
            image.save(root / "samples" / f"eval_step{step:07d}.png")
        self._to_wandb(trainer, step, columns, table, image, result)

    def _to_wandb(self, trainer: L.Trainer, step: int, columns, table, image, result: PairedResult) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                if image is not None:
                    caption = " | ".join(label for label, _ in result.grid_columns)
                    logger.log_image(f"{self.prefix}/grid", images=[image], step=step, caption=[caption])
                clean = [[None if isinstance(v, float) and math.isnan(v) else v for v in r] for r in table]
                logger.log_table(f"{self.prefix}/identities", columns=columns, data=clean, step=step)
