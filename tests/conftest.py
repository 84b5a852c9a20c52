"""Shared test setup: offline hubs, quiet W&B, small thread pools (CI has 2 cores)."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # makes `tests.toy` importable as a config target


@pytest.fixture
def repo_root() -> Path:
    return ROOT
