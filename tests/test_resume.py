"""Exact resume of the project's real pipeline (issue 26): ShardDataModule with 2 workers and the
shipped tiny stitching config, shrunk to ~10 s per run on CPU.

Every interrupted run must end bit-identical to the uninterrupted one in weights, optimizer
state and the logged curve (every training step logged once, same values; validation rows too):
(a) USR1 mid-run on a real Slurm (requeue, release, finish), (b) kill -9 then the same command,
(c) USR1 while the job is still starting (before the Trainer exists) on a real Slurm,
(d) two USR1s, at an epoch boundary and at a step where validation falls due.
Every run is an `icp fit` process with the same settings (1 thread, DDP on one CPU process, as
`icp slurm submit --gpus-per-node 0` makes it), so the runs differ only by their interruptions.
"""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from icp.cli import main
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments/stitching/tiny.yaml"
ICP = str(Path(sys.executable).with_name("icp"))
STEPS = 12  # 5 batches per epoch (5 identities x 2 pairs / batch 2): epochs end at steps 5 and 10


def overrides(shards: Path, name: str, *extra: str) -> list[str]:
    return [f"data.shards={shards / 'train'}", f"data.val_shards={shards / 'val'}", "data.num_workers=2",
            "data.batch_size=2", "data.resolution=16", "+data.pairs_per_identity=2", "+data.shuffle_buffer=4",
            "+model.backbone.width=16", "+model.backbone.text_width=16", f"trainer.max_steps={STEPS}",
            "trainer.val_check_interval=6", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "callbacks.samples=null", "logger.wandb=null",
            "checkpoint.every_n_train_steps=4", "checkpoint.keep_last=2", f"run.name={name}", *extra]


LOCAL = ["trainer.accelerator=cpu", "trainer.devices=1", "+trainer.num_nodes=1", "+trainer.strategy=ddp"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from icp.data.shards.write import synth

    root = tmp_path_factory.mktemp("resume")
    synth(root / "shards/train", 5, 3, 16, seed=0, shard_size=1, progress=False)  # 3 + 2 shards per worker
    synth(root / "shards/val", 2, 3, 16, seed=1, shard_size=1, first_identity=100, progress=False)
    environ = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                   ICP_ALLOWED_TARGETS="tests", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    for key in [k for k in environ if k.startswith("SLURM_")]:
        environ.pop(key)
    return {"root": root, "shards": root / "shards", "environ": environ}


def icp_fit(env, name, *extra, check=True):
    done = subprocess.run([ICP, "fit", str(TINY), *overrides(env["shards"], name, *LOCAL, *extra)],
                          cwd=env["root"], env=env["environ"], capture_output=True, text=True, timeout=300)
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


def run_dir(env, name):
    return env["root"] / "runs/stitching_tiny" / name


@pytest.fixture(scope="module")
def straight(env):
    icp_fit(env, "straight")
    return run_dir(env, "straight")


def logged(run: Path):
    """(train/loss by step, validation rows): each training step logged exactly once over all versions."""
    train, val = {}, []
    for f in sorted((run / "logs/csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        for row in csv.DictReader(open(f)):
            if row.get("train/loss"):
                assert row["step"] not in train, f"step {row['step']} logged twice ({f})"
                train[row["step"]] = row["train/loss"]
            if row.get("val/loss"):
                val.append((row["epoch"], row["step"], row["val/loss"]))
    return train, val


def assert_identical(run: Path, ref: Path):
    a = torch.load(ref / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    train, val = logged(ref)
    assert sorted(map(int, train)) == list(range(STEPS)) and len(val) == 2
    assert logged(run) == (train, val)


def test_two_usr1_at_an_epoch_boundary_and_where_validation_falls_due(env, straight):
    """(d) Stopped at step 5 (last batch of epoch 0), then at step 6 (validation due): three
    processes, each resuming the previous one's exact data position."""
    signals = "+callbacks.kill={_target_: tests.toy_slurm.SignalAtSteps, steps: [5, 6]}"
    first = icp_fit(env, "twice", signals)
    assert "saved" in first.stderr and "at step 5" in first.stderr
    second = icp_fit(env, "twice", signals)
    assert "at step 6" in second.stderr and "resuming" in second.stdout
    icp_fit(env, "twice", signals)
    assert_identical(run_dir(env, "twice"), straight)


def _logged_steps(run: Path) -> set[str]:
    try:
        return {row["step"] for row in csv.DictReader(open(run / "logs/csv/version_0/metrics.csv"))}
    except (OSError, KeyError):
        return set()


def test_kill_9_then_the_same_command(env, straight):
    """(b) SIGKILL (no handler runs) two steps after the step-8 checkpoint: the same command resumes
    from it, and the two steps the killed job had logged are logged once, by the resumed job."""
    cmd = [ICP, "fit", str(TINY), *overrides(env["shards"], "killed", *LOCAL)]
    proc = subprocess.Popen(cmd, cwd=env["root"], env=env["environ"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while "9" not in _logged_steps(run_dir(env, "killed")):  # optimizer step 10 logged (CSV step 9)
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before step 10"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the task and its DataLoader workers, mid-run
    proc.wait()
    done = icp_fit(env, "killed")
    assert re.search(r"resuming \S+ from (step\d+|last)\.ckpt", done.stdout)
    assert_identical(run_dir(env, "killed"), straight)


# ------------------------------------------------------------------------------ a real Slurm


def _submit(cluster, env, name, monkeypatch, capsys):
    # No virtual environment on PATH: the script must call this environment's icp by its path.
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    for key, value in env["environ"].items():
        if key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "ICP_ALLOWED_TARGETS"):
            monkeypatch.setenv(key, value)
    assert main(["slurm", "submit", str(TINY), *overrides(env["shards"], name), "--gpus-per-node", "0",
                 "--cpus-per-task", "1"]) == 0
    return re.search(r"submitted job (\d+)", capsys.readouterr().out).group(1)


def _release_requeued(cluster, job, restarts):
    deadline = time.monotonic() + 90
    while cluster.job_field(job, "Restarts") != str(restarts) or cluster.job_field(job, "JobState") != "PENDING":
        assert time.monotonic() < deadline, f"job {job} was not requeued:\n{cluster.logs()}"
        time.sleep(0.3)
    time.sleep(2.5)  # slurmd refuses a relaunch in the same second as the kill ("credential revoked")
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")


@pytest.mark.slurm
def test_slurm_usr1_mid_run_and_during_start_up(slurm_cluster, env, straight, monkeypatch, capsys):
    """(a) USR1 once training is under way, (c) USR1 while the job's task is still importing:
    both jobs requeue themselves (no FAILED, no worker traceback) and finish like the straight run."""
    cluster = slurm_cluster
    monkeypatch.chdir(env["root"])
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    mid = _submit(cluster, env, "slurm-mid", monkeypatch, capsys)
    early = _submit(cluster, env, "slurm-early", monkeypatch, capsys)

    # (c): as soon as the job step (the icp task) exists, before torch and Lightning are imported
    deadline = time.monotonic() + 120
    while f"{early}.0" not in cluster.run("squeue", "-h", "-s", "-o", "%i", check=False).stdout:
        assert time.monotonic() < deadline and cluster.job_field(early, "JobState") in ("PENDING", "RUNNING"), \
            cluster.logs()
        time.sleep(0.1)
    time.sleep(1.0)
    cluster.run("scancel", "--signal=USR1", early)
    # (a): once the first periodic checkpoint exists (mid-run; most likely mid-epoch)
    first = run_dir(env, "slurm-mid") / "checkpoints/step00000004.ckpt"
    while not first.exists():
        assert time.monotonic() < deadline + 120 and cluster.job_field(mid, "JobState") in ("PENDING", "RUNNING"), \
            cluster.logs()
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", mid)

    for job in (early, mid):
        _release_requeued(cluster, job, 1)
    for job in (early, mid):
        assert cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"), 180) == "COMPLETED", cluster.logs()

    for name, job in (("slurm-early", early), ("slurm-mid", mid)):
        log = (run_dir(env, name) / f"logs/slurm-{job}.out").read_text()
        assert "restart 1" in log and "Traceback" not in log, log[-3000:]
        assert_identical(run_dir(env, name), straight)
    early_log = (run_dir(env, "slurm-early") / f"logs/slurm-{early}.out").read_text()
    assert "before the first step" in early_log
    mid_log = (run_dir(env, "slurm-mid") / f"logs/slurm-{mid}.out").read_text()
    assert 4 <= int(re.search(r"preemption signal: saved \S+ at step (\d+)", mid_log).group(1)) < STEPS
