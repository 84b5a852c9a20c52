"""``icp fit``: build data, task and trainer from a config and train into a run directory.

Top-level config nodes (see experiments/base.yaml): ``data`` (a LightningDataModule), ``model``
(the task, a LightningModule), ``trainer`` (``lightning.Trainer`` kwargs), ``callbacks`` (name ->
node; null disables one), ``logger`` (csv / wandb switches), ``checkpoint`` (cadence, how many to
keep). This module adds what every run needs so that experiment files stay small: checkpoints
written atomically into the run directory, resume from the newest intact one, CSV and offline W&B
logs, the resolved config saved beside them. Before any of it is made, the data paths and every
``_target_`` are checked (icp.jobs.preflight); a run already at ``trainer.max_steps`` is left as
it is (no new log folder, W&B run or config copy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, OmegaConf

from icp.core import config as cfglib
from icp.core import rundir
from icp.core.checkpointing import AtomicCheckpointIO, checkpoint_step, resumable_checkpoint, start_over
from icp.core.errors import ConfigError
from icp.core.secrets import redact_tree
from icp.jobs.preflight import preflight

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also prunes the periodic file a run resumed from.

    Lightning never deletes the checkpoint the trainer resumed from (it may be a file the user
    handed in). In our run directories it is one of our own periodic files, chosen because newer
    ones were corrupt; keeping it forever would break ``checkpoint.keep_last``.
    """

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        if previous == current:
            return False
        return Path(self.dirpath).absolute() in Path(previous).absolute().parents


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    callbacks: list[L.Callback] = []
    nodes = OmegaConf.select(cfg, "callbacks", default=None) or {}
    bar = OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True)
    for name, node in nodes.items():
        if node is None:
            continue
        callback = cfglib.instantiate(node, cfg, f"callbacks.{name}")
        if isinstance(callback, ProgressBar) and bar is False:
            continue  # trainer.enable_progress_bar=false switches the bar off (Lightning refuses both)
        callbacks.append(callback)
    global_batch = OmegaConf.select(cfg, "global_batch_size", default=None)
    if global_batch and not any(type(c).__name__ == "GlobalBatchSize" for c in callbacks):
        from icp.cluster.slurm import GlobalBatchSize

        # The global batch stays fixed when the number of GPUs changes: accumulation fills the gap.
        callbacks.append(GlobalBatchSize(int(global_batch), int(cfg.data.batch_size)))
    every = OmegaConf.select(cfg, "checkpoint.every_n_train_steps", default=100)
    keep = OmegaConf.select(cfg, "checkpoint.keep_last", default=3)
    # Monitoring the global step keeps the newest `keep` periodic checkpoints; last.ckpt is the
    # newest state (also written on SIGUSR1 by PreemptionCheckpoint and at the end of fit). No
    # version counter: last.ckpt is overwritten, never joined by a last-v1.ckpt. The resume point
    # is chosen by the global step inside the files anyway (checkpointing.resumable_checkpoint).
    callbacks.append(RunCheckpoint(
        dirpath=run_dir / "checkpoints", filename="step{step:08d}", auto_insert_metric_name=False,
        every_n_train_steps=every, save_last=True, save_top_k=keep, monitor="step", mode="max",
        enable_version_counter=False,
    ))
    return callbacks


def wandb_run_id(run_dir: Path) -> str:
    """A stable W&B id per run directory, so a resumed run appends to the same W&B run.

    Derived from the directory rather than drawn at random, so every rank of a multi-process
    job (and every requeue) agrees on it without writing a shared file.
    """
    return "icp-" + hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    if OmegaConf.select(cfg, "logger.csv", default=True):
        # A new version folder per invocation: Lightning's CSV writer would otherwise replace the
        # earlier metrics.csv of a resumed run with only the new rows.
        # Flushed at every step: a killed job loses no row (rows past its resume point are dropped
        # when the same command resumes it, see _drop_rows_after).
        loggers.append(CSVLogger(save_dir=str(run_dir / "logs"), name="csv", flush_logs_every_n_steps=1))
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb", default=None)
    if wandb_cfg:
        from lightning.pytorch.loggers import WandbLogger

        opts = OmegaConf.to_container(wandb_cfg, resolve=True)
        mode = opts.pop("mode", "offline")
        if mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logger.wandb.mode must be offline, online or disabled, not {mode!r}")
        # Lightning 2.6 + wandb 0.31: `offline=True` sets a removed mode; pass `mode` instead.
        loggers.append(WandbLogger(
            save_dir=str(run_dir), name=f"{cfg.experiment}/{run_dir.name}", id=wandb_run_id(run_dir),
            resume="allow", mode=mode, config=redact_tree(json.loads(json.dumps(
                OmegaConf.to_container(cfg, resolve=True), default=str))), **opts,
        ))
    return loggers


def build(cfg: DictConfig, run_dir: Path) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate data, task and trainer (no training); used by ``fit`` and the config tests."""
    datamodule = cfglib.instantiate(cfg.data, cfg, "data")
    model = cfglib.instantiate(cfg.model, cfg, "model")
    trainer = cfglib.instantiate(
        cfg.trainer, cfg, "trainer",
        callbacks=build_callbacks(cfg, run_dir),
        logger=build_loggers(cfg, run_dir) or False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )
    return datamodule, model, trainer


def _drop_rows_after(csv_root: Path, step: int | None) -> None:
    """Remove from earlier invocations' metrics.csv what was logged after the checkpoint at global
    step ``step``: the resumed run logs it again, so the curve holds every step once. Training
    rows of optimizer step g sit at CSV step g-1, as does the validation that follows step g, which
    a checkpoint at step g precedes (the resumed run runs it)."""
    if step is None or not csv_root.is_dir():
        return
    import csv

    for path in csv_root.glob("version_*/metrics.csv"):
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields, rows = reader.fieldnames, list(reader)
        if not fields or "step" not in fields:
            continue

        def keep(row: dict) -> bool:
            try:
                at = int(row["step"])
            except (TypeError, ValueError):
                return True
            trained = any(k.startswith("train/") and row.get(k) not in (None, "") for k in row)
            return at < step - 1 or (at == step - 1 and trained)

        kept = [row for row in rows if keep(row)]
        if len(kept) == len(rows):
            continue
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)


def _finish_wandb(trainer: L.Trainer) -> None:
    """Close this fit's W&B run: otherwise the next fit in the process (``icp run`` trains several
    stages) would silently log into the same run."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        import wandb

        wandb.finish()


def fit(cfg: DictConfig) -> Path:
    """Train ``cfg`` into its run directory, resuming if it holds a checkpoint; returns the dir."""
    from icp.cluster import preempt

    # A preemption signal while data, task and trainer are built is kept for PreemptionCheckpoint
    # (the CLI installs this before importing torch; a Python caller gets it here, for this call).
    installed = preempt.install()
    try:
        return _fit(cfg)
    finally:
        if installed:
            preempt.uninstall()


def finished_step(cfg: DictConfig, run_dir: Path) -> int | None:
    """The global step of the run in ``run_dir`` when it already reached ``trainer.max_steps``
    (its newest intact checkpoint is at or past it), else None. Loads no tensors: the step comes
    from the pickle header, integrity from the zip's CRCs (checkpointing.resumable_checkpoint)."""
    max_steps = int(OmegaConf.select(cfg, "trainer.max_steps", default=-1))
    if max_steps < 0:
        return None
    ckpt = resumable_checkpoint(run_dir / "checkpoints")
    step = checkpoint_step(ckpt) if ckpt is not None else None
    return step if step is not None and step >= max_steps else None


def _fit(cfg: DictConfig) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    restart = bool(OmegaConf.select(cfg, "run.restart", default=False))
    if restart:
        # Never saved as true: a requeued job re-reading config.yaml must resume, not restart again.
        cfg = cfglib.copy(cfg)
        OmegaConf.update(cfg, "run.restart", False, force_add=True)
    preflight(cfg)
    run_dir, _ = rundir.changed_keys(cfg)  # a refused config change: before anything is written
    done = None if restart else finished_step(cfg, run_dir)
    if done is not None:
        # A no-op: no new CSV version, W&B run or config copy; fit_metrics.json (what the stage
        # runner's cache reads) only if a copied run lacks it.
        metrics = run_dir / "fit_metrics.json"
        if not metrics.is_file():
            metrics.write_text(json.dumps({"global_step": done}, indent=2))
        print(f"icp: {run_dir} already done at step {done} (trainer.max_steps={cfg.trainer.max_steps}); "
              "raise trainer.max_steps to train it further")
        return run_dir
    run_dir = rundir.prepare(cfg)
    L.seed_everything(int(OmegaConf.select(cfg, "seed", default=0)), workers=True, verbose=False)
    datamodule, model, trainer = build(cfg, run_dir)
    if restart and trainer.is_global_zero:
        start_over(run_dir / "checkpoints")
    # Rank 0 moves corrupt files aside (the others only skip them), so keep_last counts intact ones.
    ckpt = None if restart else resumable_checkpoint(run_dir / "checkpoints", move_corrupt=trainer.is_global_zero)
    if ckpt is not None and trainer.is_global_zero:
        print(f"icp: resuming {run_dir} from {ckpt.name}")
        _drop_rows_after(run_dir / "logs" / "csv", checkpoint_step(ckpt))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    finally:
        _finish_wandb(trainer)
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = {getattr(c, "_last_global_step_saved", None) for c in trainer.checkpoint_callbacks}
    # Only for a run that reached its end: a preempted run already saved its resume point.
    reached_end = trainer.max_steps < 0 or trainer.global_step >= trainer.max_steps
    if trainer.state.finished and reached_end and trainer.global_step not in saved:
        # Periodic checkpoints only land on multiples of every_n_train_steps: keep the final
        # weights too, so evaluation and a later longer run start from the end of this one.
        trainer.save_checkpoint(last)
    if trainer.is_global_zero:
        metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics["global_step"] = trainer.global_step
        (run_dir / "fit_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    from icp.cluster.preemption import after_fit

    after_fit(trainer)  # a preempted job requeues now, its DataLoader workers already gone
    return run_dir
