"""Toy data and task for the preemption and multi-process tests.

Unlike tests/toy.py they exercise every piece of state a resume must restore: the data-loader
position mid-epoch (a loader implementing Lightning's state_dict/load_state_dict protocol), the
global RNG (noise added to every batch), an LR scheduler, and the loss curve per optimizer step
(averaged over ranks) written to ``<run_dir>/loss_curve.json``.
"""

import json
import time
from pathlib import Path

import lightning as L

from tests.toy import ToyData
import torch
from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch: it skips the batches a checkpoint had consumed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._yielded, self._skip = 0, 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for i, batch in enumerate(super().__iter__()):
            if i < skip:
                continue
            self._yielded += 1
            yield batch

    def state_dict(self):
        # Lightning fetches a sized loader's batches one at a time (no look-ahead), so what was
        # yielded is what was trained on; after the last batch the next epoch starts afresh.
        return {"consumed": self._yielded % len(self)}

    def load_state_dict(self, state):
        self._skip = int(state["consumed"])


class ResumableData(ToyData):
    """ToyData whose loader remembers its position, so a mid-epoch resume skips what was seen."""

    def __init__(self, n: int = 28, batch_size: int = 4, seed: int = 0):
        super().__init__(n=n, batch_size=batch_size, seed=seed)

    def train_dataloader(self):
        return ResumableLoader(self.data, batch_size=self.batch_size, shuffle=False)


class NoisyTask(L.LightningModule):
    def __init__(self, optimizer, hidden: int = 8, noise: float = 0.1, step_seconds: float = 0.0):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        self.optimizer = optimizer
        self.noise = noise
        self.step_seconds = step_seconds  # slows the run so a test can signal it mid-way
        self.curve: list[float] = []
        self._losses: list[torch.Tensor] = []
        self._last_step = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + self.noise * torch.randn_like(x)  # draws from the global RNG every step
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self._losses.append(loss.detach())
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step == self._last_step:
            return  # still accumulating
        self._last_step = self.trainer.global_step
        mean = torch.stack(self._losses).mean()
        self._losses = []
        self.curve.append(float(self.trainer.strategy.reduce(mean, reduce_op="mean")))

    def on_train_end(self):
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / "loss_curve.json"
            path.write_text(json.dumps({"start_step": self.trainer.global_step - len(self.curve), "loss": self.curve}))

    def configure_optimizers(self):
        opt = self.optimizer(self.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class SignalAtStep(L.Callback):
    """Sends the preemption signal to this process during optimizer step ``step`` of a fresh run."""

    def __init__(self, step: int, signum: str = "SIGUSR1"):
        self.step, self.signum = step, signum
        self.armed = False

    def on_train_start(self, trainer, pl_module):
        self.armed = trainer.global_step == 0  # a resumed run is not signalled again

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.armed and trainer.global_step == self.step - 1:
            import os
            import signal

            os.kill(os.getpid(), signal.Signals[self.signum])


class SignalAtSteps(L.Callback):
    """Sends the preemption signal during the first of ``steps`` that lies ahead of where this
    process started: one signal per invocation, so a resumed run is stopped at the next one."""

    def __init__(self, steps: list[int], signum: str = "SIGUSR1"):
        self.steps, self.signum = sorted(int(s) for s in steps), signum
        self.target: int | None = None

    def on_train_start(self, trainer, pl_module):
        self.target = next((s for s in self.steps if s > trainer.global_step), None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.target is not None and trainer.global_step == self.target - 1:
            import os
            import signal

            self.target = None
            os.kill(os.getpid(), signal.Signals[self.signum])
