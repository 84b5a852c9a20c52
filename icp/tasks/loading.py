"""Load a trained task from a run directory (or a checkpoint inside one) for inference/evaluation.

The task is rebuilt from the run's saved ``config.yaml`` (its ``model`` node, exactly as training
built it) and the checkpoint's weights are loaded through the task's own Lightning hook, so EMA
weights and weights left out of checkpoints (frozen parts) come back as training had them.
Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only,
so a checkpoint downloaded from someone else cannot run code when loaded. Our own tasks' checkpoints
load that way (hyper-parameters hold no callables; RNG states are stored as tensors). A file that
needs full unpickling is refused unless the caller passes ``trust_checkpoint=True`` (CLI:
``--trust-checkpoint``), which says what it risks. Resuming a run (``icp fit``) goes through
Lightning, which also loads with ``weights_only=True`` under torch >= 2.6.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from icp.core import config as cfglib
from icp.core.checkpointing import checkpoint_problem, resumable_checkpoint
from icp.core.errors import WeightsError

log = logging.getLogger(__name__)
TRUST_HINT = ("pass --trust-checkpoint (Python: trust_checkpoint=True) only if you trust whoever made it: "
              "that runs pickled code from the file")


def read_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> dict:
    """A checkpoint's contents, loaded with ``weights_only=True`` unless ``trust_checkpoint``.

    Raises WeightsError naming the file: unreadable (truncated, not a torch file), or holding
    pickled objects (naming the first one) while ``trust_checkpoint`` is False.
    """
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"pickled Python objects (first: {found.group(1)})" if found else "pickled Python objects"
        if not trust_checkpoint:
            raise WeightsError(f"{path}: refused, it holds {what}; {TRUST_HINT}") from None
        log.warning("loading %s with full unpickling (trust_checkpoint=True): it can run code", path)
        blob = _load_any(path, weights_only=False)
    except Exception as err:  # noqa: BLE001 -- zip/EOF/runtime errors of many kinds: not a readable checkpoint
        raise WeightsError(f"{path}: cannot read checkpoint ({type(err).__name__}); is the file complete?") from None
    if not isinstance(blob, dict):
        raise WeightsError(f"{path}: holds a {type(blob).__name__}, not a checkpoint dict (state_dict ...)")
    return blob


def _load_any(path: Path, weights_only: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # noqa: BLE001
        raise WeightsError(f"{path}: cannot read checkpoint ({type(err).__name__}: {str(err)[:100]})") from None


def locate_run(path: str | Path) -> tuple[Path, Path]:
    """(run_dir, checkpoint) for a run directory or a checkpoint file inside ``<run>/checkpoints``."""
    path = Path(path)
    if path.is_dir():
        run_dir = path
        ckpt = resumable_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            raise WeightsError(f"{run_dir} has no intact checkpoint under checkpoints/; train it with `icp fit` first")
    elif path.is_file():
        ckpt, run_dir = path, path.parent.parent
        problem = checkpoint_problem(ckpt)
        if problem:
            raise WeightsError(f"{ckpt}: {problem}; use an earlier checkpoint of the run")
    else:
        raise WeightsError(f"{path}: no such run directory or checkpoint")
    if not (run_dir / "config.yaml").is_file():
        raise WeightsError(f"{run_dir} has no config.yaml: pass a run directory made by `icp fit` (or a checkpoint in its checkpoints/)")
    return run_dir, ckpt


def load_task(path: str | Path, device: str | torch.device = "cpu", trust_checkpoint: bool = False,
              compile: bool = True):
    """The task (LightningModule) of a run, with its checkpoint's weights, in eval mode, prepared
    for sampling (``DiffusionTask.prepare_inference``: the run's ``model.perf`` switches).

    ``trust_checkpoint``: allow a checkpoint that needs full unpickling (it can run code).
    ``compile=False``: no torch.compile (for a few images: compiling costs ~2 minutes on CUDA).
    """
    run_dir, ckpt = locate_run(path)
    cfg = cfglib.load(run_dir / "config.yaml")
    from icp.core.runs import anchor_stored_paths

    anchor_stored_paths(run_dir, cfg)  # the stitching run / base it names, also from another folder
    # Read (and refuse) the checkpoint before building the task: refusal should be quick.
    checkpoint = read_checkpoint(ckpt, trust_checkpoint)
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise WeightsError(f"{ckpt}: has no 'state_dict'; pass a checkpoint written by `icp fit`")
    task = cfglib.instantiate(cfg.model, cfg, "model")
    task.on_load_checkpoint(checkpoint)
    try:
        task.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:  # missing/unexpected keys or shapes: weights of another model
        first = str(err).strip().splitlines()[-1].strip()[:160]
        raise WeightsError(f"{ckpt}: weights do not fit the run's model ({first}); use a checkpoint of this run") from None
    task = task.to(device).eval()
    # Evaluation only samples: bf16 weights, compiled blocks on CUDA (model.perf; no-op on CPU).
    if hasattr(task, "prepare_inference"):  # DiffusionTask; other LightningModules load as they are
        task.prepare_inference(device, compile=compile)
    return task
