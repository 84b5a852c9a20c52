"""Checkpoints that survive preemption: atomic writes, integrity checks, fallback on resume.

A job killed mid-write must never leave a file that looks like a checkpoint. Lightning writes
checkpoints in place, so ``AtomicCheckpointIO`` writes to ``<name>.tmp`` and renames (a rename is
atomic on POSIX filesystems). At resume every candidate is checked (torch checkpoints are zip
archives, so the per-member CRCs catch truncation and bit flips) and a bad one is reported in one
line and skipped in favour of the newest good one.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose files appear only once they are complete."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint, or None if it is intact."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"not a complete checkpoint ({err.__class__.__name__}: {err})"
    if bad is not None:
        return f"corrupt member {bad}"
    return None


def resumable_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest intact checkpoint in ``ckpt_dir`` (``last.ckpt`` first), or None."""
    if not ckpt_dir.is_dir():
        return None
    last = ckpt_dir / "last.ckpt"
    others = sorted((p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt"),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    candidates = ([last] if last.is_file() else []) + others
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s; resuming from an older one", path, problem)
    return None
