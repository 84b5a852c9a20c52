"""Shared test setup: offline hubs, quiet W&B, small thread pools (CI has 2 cores)."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
# Test configs build objects from tests/ (toy tasks); a config file cannot trust a module itself.
os.environ.setdefault("ICP_ALLOWED_TARGETS", "tests")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """Small models on a shared 2-core machine: several OpenMP threads per op only spin-wait."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def close_wandb_runs():
    """A test that opens a W&B run without closing it would make later WandbLoggers reuse it."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
