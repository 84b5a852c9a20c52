"""A training progress bar by global step over the whole run, with rate and ETA.

Lightning's bar counts batches of the current epoch: with shard streams (no length) it shows
``Epoch 0/-2`` or ``7/2`` and no overall ETA. This one counts optimizer steps towards
``trainer.max_steps`` and starts at the resumed step, so its rate and ETA cover what is left of the
run (the rate is measured over this invocation only: a resume does not count the restored steps as
instantly done). It writes to stderr, as progress should; stdout stays for results.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

# `{remaining}` is tqdm's estimate of the time left; with smoothing=0 it is (steps left) / (mean rate).
BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar:20}| {elapsed} elapsed, ETA {remaining}, {rate_fmt}{postfix}"
# max_steps=-1 (an epoch-bounded run): no total, so no bar and no ETA.
OPEN_FORMAT = "{desc} {n_fmt} [{elapsed} elapsed, {rate_fmt}{postfix}]"


class StepProgressBar(TQDMProgressBar):
    """``step g/max_steps`` with rate and ETA; validation bars as Lightning draws them, on stderr."""

    def _bar(self, desc: str, leave: bool, position: int = 0, **kwargs: Any) -> Tqdm:
        return Tqdm(desc=desc, position=2 * self.process_position + position, disable=self.is_disabled,
                    leave=leave, dynamic_ncols=True, file=sys.stderr, smoothing=0, **kwargs)

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        return self._bar("step", True, total=total, initial=trainer.global_step, unit="step",
                         bar_format=BAR_FORMAT if total else OPEN_FORMAT)

    def init_sanity_tqdm(self) -> Tqdm:
        return self._bar(self.sanity_check_description, False)

    def init_validation_tqdm(self) -> Tqdm:
        main_bar = self.trainer.state.fn != "validate"  # below the step bar, and gone when done
        return self._bar(self.validation_description, not main_bar, position=int(main_bar))

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        # One bar for the whole run: no reset per epoch (Lightning's bar restarts at 0 each epoch).
        pass

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step  # advances once per optimizer step, not per accumulated micro-batch
        if bar is None or bar.disable or step == bar.n:
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
