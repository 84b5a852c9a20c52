"""The earliest SIGUSR1 handler: notes Slurm's preemption signal until the trainer can act on it.

USR1's default action kills the process. ``icp fit`` takes seconds to import torch and Lightning
and more to build data, task and trainer, before ``PreemptionCheckpoint`` installs its handler;
a signal then used to end the job FAILED with no checkpoint and no requeue. This module imports
nothing heavy, so the CLI installs it first thing; the callback takes the note over in ``setup``
(before the first step: a clean requeue, nothing new to save).
"""

from __future__ import annotations

import signal
import threading

_noted = False


def _note(signum, frame) -> None:
    global _noted
    _noted = True


def install(signum: signal.Signals = signal.SIGUSR1) -> bool:
    """Note ``signum`` from now on (main thread only; a handler set by someone else is kept).
    True if this call installed it (the caller then ``uninstall``s it when done)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signum) in (signal.SIG_DFL, None):
        signal.signal(signum, _note)
        return True
    return False


def uninstall(signum: signal.Signals = signal.SIGUSR1) -> None:
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signum) is _note:
        signal.signal(signum, signal.SIG_DFL)
    take()


def take() -> bool:
    """Whether the signal came since the last call (and forget it)."""
    global _noted
    noted, _noted = _noted, False
    return noted
