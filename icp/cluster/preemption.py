"""Surviving preemption: the one SIGUSR1 handler, the RNG states in every checkpoint, the requeue.

``PreemptionCheckpoint`` only notes the signal; at the next optimizer-step boundary all ranks agree
to stop, save ``last.ckpt`` (which ``icp fit`` resumes from), requeue the job and stop. It also keeps
the global RNG states in every checkpoint (docs/decisions/slurm.md).
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from icp.core.errors import IcpError

log = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """Global RNG states as tensors and plain values (checkpoints load with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class PreemptionCheckpoint(L.Callback):
    """Save on ``SIGUSR1`` at a step boundary, stop, and let ``icp fit`` requeue; RNG states and a
    resumable loop state in every checkpoint.

    Why not Lightning's own SLURM handler: it saves ``hpc_ckpt_N.ckpt`` from inside the signal
    handler, i.e. at whatever bytecode the main thread was running (possibly between the optimizer
    update and the progress counters), into a place ``icp fit`` does not resume from, and each
    rank acts on its own. Here the handler only sets a flag (also for a signal before the Trainer
    exists: icp.cluster.preempt); at the end of the next optimizer step the ranks reduce it (so all
    stop at the same step), every rank joins the save (FSDP needs it) and the trainer stops
    without running the validation that may fall due at that step (the resumed job runs it).
    ``icp fit`` runs ``scontrol requeue`` once the trainer and its DataLoader workers are down
    (``after_fit``); a signal before the first step stops at once with nothing new to save.
    Lightning's handler is switched off (``auto_requeue=False``) so this is the only one.
    """

    def __init__(self, signum: str = "SIGUSR1", requeue: bool = True):
        self.signum = signal.Signals[signum] if isinstance(signum, str) else signal.Signals(signum)
        self.requeue = requeue
        self.requested = False
        self.preempted_at: int | None = None  # global step of the preemption stop, for after_fit
        self._previous: Any = None
        self._last_step = -1
        self._pending_rng: dict[str, Any] | None = None
        self._val_rng: dict[str, Any] | None = None
        self._boundary: tuple[int, bool] | None = None  # (step, validation due) at a step's end
        self._trainer: L.Trainer | None = None

    # -- signal handling
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        from icp.cluster import preempt

        self._trainer = trainer
        # Lightning registers its handler after `setup`; disabling auto-requeue keeps it away.
        envs = {getattr(trainer.strategy, "cluster_environment", None),
                getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)}
        for env in envs:
            if isinstance(env, SLURMEnvironment):
                env.auto_requeue = False
        # A signal noted since the process started (imports, building data and task) counts.
        self.requested = preempt.take() if self.signum == signal.SIGUSR1 else False
        self.preempted_at = None
        if self._previous is None and _main_thread():
            self._previous = signal.signal(self.signum, self._note)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        _mend_epoch_end(trainer)
        if _main_thread():  # again, in case another handler was set since `setup`
            signal.signal(self.signum, self._note)
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            # Before the first step: nothing new since the checkpoint we started from.
            log.info("preemption signal before the first step (step %d): stopping, nothing new to save",
                     trainer.global_step)
            self.preempted_at = trainer.global_step
            trainer.should_stop = True
            _claim_last_checkpoint(trainer, None)

    def _note(self, signum, frame) -> None:
        # Only a flag: the state is saved where it is consistent (on_train_batch_end).
        self.requested = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._boundary = None
        if self._pending_rng is not None:  # see load_state_dict
            set_rng_states(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:
            return  # inside a gradient-accumulation window: no consistent state to save yet
        self._last_step = trainer.global_step
        # Checkpoints written from here on (this one, ModelCheckpoint's) precede the validation
        # that may fall due now: on_save_checkpoint makes a resume run it first.
        self._boundary = (trainer.global_step, _validation_due(trainer))
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        if trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
            return  # the run ends here anyway and saves its final state: nothing to requeue
        path = preemption_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.info("preemption signal: saved %s at step %d", path, trainer.global_step)
        _claim_last_checkpoint(trainer, str(path))
        self.preempted_at = trainer.global_step
        trainer.should_stop = True
        # Lightning validates when a run stops early; the requeued job does it (the checkpoint
        # says it is due), so this one exits within the signal's grace time.
        trainer.fit_loop.epoch_loop._skip_next_val = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._boundary = None

    # -- validation draws no random numbers from the training's stream
    def on_validation_start(self, trainer, pl_module) -> None:
        if self._pending_rng is not None:  # a resumed run's first act is the validation due
            set_rng_states(self._pending_rng)
            self._pending_rng = None
        self._boundary = None
        self._val_rng = rng_states()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_rng is not None:
            set_rng_states(self._val_rng)
            self._val_rng = None

    # -- the loop state a resume needs
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        boundary = self._boundary
        if boundary is None or boundary[0] != trainer.global_step:
            return
        _resumable_loops(checkpoint, validation_due=boundary[1],
                         unsized=trainer.num_training_batches == float("inf"))

    # -- RNG states travel in every checkpoint (periodic ones too)
    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        last = bool(trainer is not None and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        return {"rng": rng_states(), "mid_epoch": not last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rng = state_dict.get("rng")
        if rng is None:
            return
        # A resumed run rebuilds its train iterator right after restoring, and a DataLoader
        # without its own generator draws a seed from the global RNG then; the uninterrupted run
        # drew it at the epoch start: before a mid-epoch save, after an end-of-epoch one.
        # Restoring at the matching point keeps both runs on the same random stream.
        if state_dict.get("mid_epoch", True):
            self._pending_rng = rng
        else:
            set_rng_states(rng)


def _claim_last_checkpoint(trainer: L.Trainer, path: str | None) -> None:
    """Keep ModelCheckpoint(save_last=True) from writing last.ckpt at train end after a preemption
    stop (it does when it has not saved in this process): that state, after the epoch-end hooks
    or before any step, is not a step-boundary state. ``path``: the preemption file, now its last."""
    for callback in trainer.checkpoint_callbacks:
        if hasattr(callback, "_last_checkpoint_saved"):
            callback._last_checkpoint_saved = path or callback._last_checkpoint_saved or "preempted"
            if path:
                callback.last_model_path = path
            callback._last_global_step_saved = trainer.global_step


def _validation_due(trainer: L.Trainer) -> bool:
    """Whether Lightning validates after this training step (its own rule, asked before should_stop)."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(trainer.enable_validation and loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):  # another Lightning version: keep its own behaviour
        return False


def _resumable_loops(checkpoint: dict[str, Any], validation_due: bool, unsized: bool) -> None:
    """Rewrite the loop progress of a checkpoint saved at the end of a training step so that
    Lightning (2.6) resumes it the way the uninterrupted run went on.

    - Validation due at this step: Lightning would skip it on resume (it fast-forwards the
      validation progress). Marked as "step complete, validation started", the resumed run goes
      back and runs it, then trains on (Lightning's mid-validation restart).
    The other case Lightning gets wrong, the last batch of an unsized loader's epoch, is
    mended when the run has restored it (``_mend_epoch_end``).
    """
    loops = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(loops, dict):
        return
    batches = loops.get("epoch_loop.batch_progress")
    val = loops.get("epoch_loop.val_loop.batch_progress")
    if not batches or batches["total"]["processed"] != batches["total"]["completed"] + 1:
        return  # not saved at the end of a training step
    if validation_due and val:
        total = val["total"]
        if not (total["ready"] == total["started"] == total["processed"] == total["completed"]):
            return
        for part in ("total", "current"):
            batches[part]["completed"] += 1
        total["ready"] += 1
        total["started"] += 1
        val["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
        val["is_last_batch"] = False


def _mend_epoch_end(trainer: L.Trainer) -> None:
    """Resumed from the end of a training step that ended an unsized (iterable) loader's epoch,
    with no validation due: Lightning (2.6) moves to the next epoch but keeps the old epoch's batch
    progress (it resets it only for sized loaders), so that epoch would end at once, untrained.
    Do what it does for sized loaders, before the epoch loop starts."""
    loop = trainer.fit_loop.epoch_loop
    progress = loop.batch_progress
    if not (trainer.num_training_batches == float("inf") and loop.restarted_on_train_batch_end
            and progress.is_last_batch):
        return
    progress.increment_completed()  # what the epoch loop's reset would do, once
    progress.reset_on_run()
    loop.scheduler_progress.reset_on_run()
    loop.automatic_optimization.optim_progress.reset_on_run()
    loop.val_loop.batch_progress.total.reset()
    progress.is_last_batch = False
    loop.reset_restart_stage()


def after_fit(trainer: L.Trainer) -> None:
    """After ``trainer.fit`` returned (workers and loggers closed): requeue a preempted job.

    A failed ``scontrol requeue`` raises: the job must end FAILED, not COMPLETED with its
    training unfinished.
    """
    stopped = [c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint) and c.preempted_at is not None]
    if not stopped or not trainer.is_global_zero:
        return
    callback = stopped[0]
    if not callback.requeue:
        log.info("preempted at step %d; run the same command to resume", callback.preempted_at)
        return
    done = requeue_job()
    if done is False:
        raise IcpError(f"preempted at step {callback.preempted_at} (state saved) but `scontrol requeue` failed; "
                       "the training is unfinished: resubmit the same command to resume it")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def preemption_checkpoint_path(trainer: L.Trainer) -> Path:
    """``last.ckpt`` beside the periodic checkpoints: what ``icp fit`` resumes from first."""
    ckpt = trainer.checkpoint_callback
    folder = Path(ckpt.dirpath) if ckpt is not None and getattr(ckpt, "dirpath", None) else \
        Path(trainer.default_root_dir) / "checkpoints"
    return folder / "last.ckpt"


def requeue_job() -> bool | None:
    """``scontrol requeue`` this job (array tasks too); None when not under SLURM, False if it fails."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job or not re.fullmatch(r"[0-9_]+", job):
        log.info("preemption signal outside a SLURM job: checkpoint saved, nothing to requeue; "
                 "run the same command to resume")
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("scontrol requeue %s failed: %s", job, err)
        return False
    if done.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True


