"""Hostile arguments and files for the module entry points of the 64-px profile
(python -m icp.eval.correspondence, python -m icp.eval.base_samples): one argparse line, exit 2,
quickly -- never a traceback, a hang on a FIFO or an unpickled object array."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from icp.eval import base_samples, correspondence

ROOT = Path(__file__).resolve().parents[1]


def one_line_exit(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("extra,needle", [
    (["--pairs", "0"], "outside 1..4096"),
    (["--pairs", "nan"], "not a whole number"),
    (["--timesteps", "50", "5000"], "outside 0..999"),
    (["--ensemble", "1e9"], "not a whole number"),
    (["--dtype", "float8"], "invalid choice"),
    (["--tiny", "[1, 2]"], "JSON object"),
    (["--tiny", "{not json"], "JSON object"),
])
def test_correspondence_refuses_bad_arguments(extra, needle, capsys, tmp_path):
    line = one_line_exit(correspondence.main, ["--backbone", "tiny", "--out", str(tmp_path), *extra], capsys)
    assert needle in line, line


def test_correspondence_refuses_a_folder_that_is_not_a_base(capsys, tmp_path):
    line = one_line_exit(correspondence.main, ["--backbone", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert "not a base folder" in line and not (tmp_path / "o").exists()


def test_base_samples_refuses_bad_counts_and_missing_runs(capsys, tmp_path):
    assert "outside 1..50000" in one_line_exit(base_samples.main, ["sample", str(tmp_path), "--count", "-1",
                                                                   "--out", "x.npz"], capsys)
    assert "no such run directory" in one_line_exit(base_samples.main, ["sample", str(tmp_path / "none"),
                                                                        "--out", "x.npz"], capsys)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.npz"
    np.savez(good, images=np.zeros((2, 8, 8, 3), np.uint8))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:40])
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, images=np.array([{"a": 1}], dtype=object))
    shaped = tmp_path / "shaped.npz"
    np.savez(shaped, images=np.zeros((2, 8, 8), np.float32))
    other = tmp_path / "other.npz"
    np.savez(other, pictures=np.zeros((2, 8, 8, 3), np.uint8))
    return {"truncated": truncated, "pickled": pickled, "shaped": shaped, "other": other}


@pytest.mark.parametrize("kind", ["truncated", "pickled", "shaped", "other", "missing"])
def test_base_samples_score_refuses_files_that_are_not_samples(kind, capsys, tmp_path):
    path = _bad_files(tmp_path).get(kind, tmp_path / "missing.npz")
    line = one_line_exit(base_samples.main, ["score", str(path), "--heldout", str(tmp_path)], capsys)
    assert str(path) in line and ("samples file" in line or "uint8" in line), line


def test_base_samples_score_on_a_fifo_returns_at_once(tmp_path):
    fifo = tmp_path / "samples.npz"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "icp.eval.base_samples", "score", str(fifo), "--heldout", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "no such samples file" in done.stderr and "Traceback" not in done.stderr
