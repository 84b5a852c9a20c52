"""Two gloo DDP processes on CPU train like one process with the same global batch.

`icp fit` runs as a subprocess (Lightning's DDP launcher re-runs the command for rank 1, which it
cannot do from inside pytest). GlobalBatchSize keeps 16 samples per optimizer step: 1 process x 8
x 2 accumulation, or 2 processes x 8 x 1; the DistributedSampler's interleaved halves make up the
same 16 samples as the single process's two micro-batches, so the curves agree up to float
summation order.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

CONFIG = "tests/configs/slurm_ddp.yaml"


def start_fit(repo_root, cwd, name, devices):
    env = dict(os.environ, PYTHONPATH=str(repo_root), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "icp.cli", "fit", str(repo_root / CONFIG), f"run.name={name}",
           f"trainer.devices={devices}"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_two_ddp_processes_match_one_process_with_the_same_global_batch(repo_root, tmp_path):
    # Both runs at once: start-up (imports) dominates and overlaps.
    procs = start_fit(repo_root, tmp_path, "one", 1), start_fit(repo_root, tmp_path, "two", 2)
    out1, out2 = (finish(p) for p in procs)
    one, two = tmp_path / "runs/slurm_ddp/one", tmp_path / "runs/slurm_ddp/two"
    assert "8 per device x 1 devices x 1 nodes x 2 accumulation" in out1
    assert "8 per device x 2 devices x 1 nodes x 1 accumulation" in out2
    assert "Starting with 2 processes" in out2
    c1 = json.loads((one / "loss_curve.json").read_text())["loss"]
    c2 = json.loads((two / "loss_curve.json").read_text())["loss"]
    assert len(c1) == len(c2) == 8
    assert torch.allclose(torch.tensor(c1), torch.tensor(c2), rtol=1e-5, atol=1e-6), (c1, c2)
    assert c1[0] != pytest.approx(c1[-1])  # it trains: the curve is not flat
    w1 = torch.load(one / "checkpoints/last.ckpt", weights_only=False)
    w2 = torch.load(two / "checkpoints/last.ckpt", weights_only=False)
    assert w1["global_step"] == w2["global_step"] == 8
    for k, v in w1["state_dict"].items():
        assert torch.allclose(v, w2["state_dict"][k], rtol=1e-5, atol=1e-6), k
