"""Load a trained task from a run directory (or a checkpoint inside one) for inference/evaluation.

The task is rebuilt from the run's saved ``config.yaml`` (its ``model`` node, exactly as training
built it) and the checkpoint's weights are loaded through the task's own Lightning hook, so EMA
weights and weights left out of checkpoints (frozen parts) come back as training had them.
Resuming a run's own Lightning checkpoint is the one place a full (pickled) checkpoint is read;
a foreign ``.ckpt`` must live in a run directory with its config, like ours do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from icp import config as cfglib
from icp.checkpointing import checkpoint_problem, resumable_checkpoint
from icp.errors import WeightsError


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


def load_task(path: str | Path, device: str | torch.device = "cpu"):
    """The task (LightningModule) of a run, with its checkpoint's weights, in eval mode."""
    run_dir, ckpt = locate_run(path)
    cfg = cfglib.load(run_dir / "config.yaml")
    task = cfglib.instantiate(cfg.model, cfg, "model")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    task.on_load_checkpoint(checkpoint)
    task.load_state_dict(checkpoint["state_dict"])
    return task.to(device).eval()
