"""Checkpoints that survive preemption: atomic writes, integrity checks, fallback on resume.

A job killed mid-write must never leave a file that looks like a checkpoint. Lightning writes
checkpoints in place, so ``AtomicCheckpointIO`` writes to ``<name>.tmp`` and renames (a rename is
atomic on POSIX filesystems). At resume every candidate is checked (torch checkpoints are zip
archives, so the per-member CRCs catch truncation and bit flips) and a bad one is reported in one
line and skipped in favour of the newest good one. "Newest" is the global step stored in the file,
never its name or mtime (one rule for ``icp fit``, ``appearance_from``, ``icp generate`` and
``icp eval``). When none is intact the run stops with a one-line error: never a silent restart.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from icp.core.errors import WeightsError

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


class _Anything(dict):
    """Stands in for every class while peeking at a checkpoint's pickle: nothing is imported or run."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        pass

    def __call__(self, *args, **kwargs):  # a pickled reduce may call what a stand-in returned
        return _Anything()


class _Peek(pickle.Unpickler):
    def find_class(self, module, name):
        return _Anything

    def persistent_load(self, pid):
        return None  # tensor storages: not read


def checkpoint_step(path: Path) -> int | None:
    """The ``global_step`` stored in a Lightning checkpoint, read from its pickle alone (no tensor
    data, no class imported, so also safe on someone else's file); None if it cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return None
            blob = _Peek(io.BytesIO(archive.read(name))).load()
    except Exception:  # noqa: BLE001 -- truncated, not a zip, odd pickle: no step to read
        return None
    step = blob.get("global_step") if isinstance(blob, dict) else None
    return int(step) if isinstance(step, int) and not isinstance(step, bool) else None


CORRUPT_DIR = "corrupt"


def _move_aside(path: Path) -> None:
    """Out of the way of every later lookup (``*.ckpt`` in the folder), kept for inspection."""
    folder = path.parent / CORRUPT_DIR
    folder.mkdir(exist_ok=True)
    target = folder / path.name
    n = 0
    while target.exists():
        n += 1
        target = folder / f"{path.name}.{n}"
    try:
        os.replace(path, target)
        log.warning("moved corrupt checkpoint %s to %s", path.name, target)
    except OSError as err:  # another rank moved it first, or a read-only folder
        log.warning("could not move corrupt checkpoint %s aside: %s", path, err)


def resumable_checkpoint(ckpt_dir: Path, move_corrupt: bool = False) -> Path | None:
    """The checkpoint to resume from: the newest intact one in ``ckpt_dir`` by the global step
    stored inside it, whatever its file name (``last.ckpt``, ``step*.ckpt``, ``last-v1.ckpt``);
    at equal steps ``last.ckpt``, then the most recently written. None when the folder holds no checkpoint at all.

    Corrupt or truncated files newer than the one chosen are reported; with ``move_corrupt``
    (``icp fit`` on rank 0) they are moved into ``<ckpt_dir>/corrupt/``, so that they are neither
    candidates again nor counted against ``checkpoint.keep_last``. When checkpoints exist (or
    were moved aside earlier) but none is intact, WeightsError names them instead of answering
    None: a caller must never silently start from scratch in a run directory that had a state.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    files = [p for p in ckpt_dir.glob("*.ckpt") if p.is_file()]
    readable, bad = [], []
    for path in files:
        step = checkpoint_step(path)
        if step is None:
            bad.append((path, checkpoint_problem(path) or "no global_step inside (not a Lightning checkpoint)"))
        else:
            readable.append(((step, path.name == "last.ckpt", path.stat().st_mtime), path))
    chosen = None
    for _, path in sorted(readable, key=lambda r: r[0], reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            chosen = path
            break
        bad.append((path, problem))
    for path, problem in bad:
        log.warning("skipping checkpoint %s: %s", path, problem)
        if move_corrupt and chosen is not None:
            _move_aside(path)
    if chosen is not None:
        return chosen
    earlier = sorted(p.name for p in (ckpt_dir / CORRUPT_DIR).glob("*")) if (ckpt_dir / CORRUPT_DIR).is_dir() else []
    if bad or earlier:
        names = ", ".join(sorted(p.name for p, _ in bad) + [f"{CORRUPT_DIR}/{n}" for n in earlier][:8])
        raise WeightsError(f"{ckpt_dir}: no intact checkpoint to resume from ({names} are corrupt or truncated); "
                           "pass run.restart=true to start this run over (they are kept in checkpoints/old-N/), "
                           "or restore a good copy")
    return None


def start_over(ckpt_dir: Path) -> Path | None:
    """``run.restart=true``: move every checkpoint (and the corrupt/ folder) into
    ``<ckpt_dir>/old-N/`` so that the run trains from step 0; returns that folder, or None."""
    ckpt_dir = Path(ckpt_dir)
    moving = [p for p in ckpt_dir.glob("*.ckpt")] + [p for p in (ckpt_dir / CORRUPT_DIR,) if p.exists()]
    if not moving:
        return None
    n = 0
    while (ckpt_dir / f"old-{n}").exists():
        n += 1
    target = ckpt_dir / f"old-{n}"
    target.mkdir()
    for path in moving:
        os.replace(path, target / path.name)
    log.warning("run.restart=true: moved %d checkpoint(s) to %s; training starts from step 0", len(moving), target)
    return target
