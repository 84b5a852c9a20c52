"""`icp slurm`: script rendering, global batch size, preemption checkpoints, a real Slurm requeue."""

import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from icp.core import config as cfglib
from icp.cli import main
from icp.core.errors import ConfigError
from icp.cluster.slurm import JobSpec, accumulation_steps, parse_job_id, prepare_config, render_script
from icp.jobs.fit import fit
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

TOY = "tests/configs/slurm_toy.yaml"


def ckpt(run_dir, name="last.ckpt"):
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)


def same_state(a, b):
    """Bit-identical weights, optimizer moments and scheduler state."""
    assert a["global_step"] == b["global_step"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def curve(run_dir):
    return json.loads((run_dir / "loss_curve.json").read_text())


# ------------------------------------------------------------------------------- pure pieces


def test_accumulation_keeps_the_global_batch():
    assert accumulation_steps(64, 8, devices=1) == 8
    assert accumulation_steps(64, 8, devices=4) == 2
    assert accumulation_steps(64, 8, devices=4, num_nodes=2) == 1
    with pytest.raises(ConfigError, match="not a multiple.*data.batch_size"):
        accumulation_steps(64, 8, devices=3)


def test_parse_job_id():
    assert parse_job_id("4711\n") == "4711"
    assert parse_job_id("4711;cluster\n") == "4711"
    assert parse_job_id("Submitted batch job 12\n") == "12"
    with pytest.raises(Exception, match="job id"):
        parse_job_id("sbatch: error: Batch job submission failed")


def test_dry_run_prints_the_script_and_writes_nothing(repo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["slurm", "submit", str(repo_root / TOY), "trainer.max_steps=7", "--nodes", "2",
               "--gpus-per-node", "4", "--time", "2:00:00", "--partition", "gpu", "--account", "lab",
               "--env-setup", "source .venv/bin/activate", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "runs").exists()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=USR1@90", "#SBATCH --requeue", "#SBATCH --time=2:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "source .venv/bin/activate"):
        assert line in out.splitlines(), line
    run_dir = re.search(r"# run directory: (\S+)", out).group(1)
    # the icp of the submitting environment, by absolute path: not whatever `icp` the job's PATH has
    icp = str(Path(sys.executable).with_name("icp"))
    assert Path(icp).is_file() and f"srun --kill-on-bad-exit=1 {icp} fit {run_dir}/config.yaml" in out
    rest = out.replace(icp, "")
    assert str(tmp_path) not in rest and str(repo_root) not in rest  # no other machine paths


def test_gpus_per_node_0_is_a_cpu_job(repo_root):
    spec = JobSpec(gpus_per_node=0)
    cfg = prepare_config(cfglib.load(repo_root / TOY), spec)
    assert (cfg.trainer.devices, cfg.trainer.accelerator) == (1, "cpu")
    script = render_script(cfg, repo_root / "x", spec)
    assert "#SBATCH --ntasks-per-node=1" in script and "--gpus-per-node" not in script
    with pytest.raises(ConfigError, match="gpus-per-node"):
        JobSpec(gpus_per_node=-1).check()


def test_prepare_config_matches_the_allocation(repo_root):
    cfg = prepare_config(cfglib.load(repo_root / TOY), JobSpec(nodes=2, gpus_per_node=4))
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.accelerator) == (2, 4, "gpu")
    assert cfg.trainer.strategy == "ddp"
    fsdp = prepare_config(cfglib.load(repo_root / TOY, ["+trainer.strategy=fsdp"]), JobSpec())
    assert fsdp.trainer.strategy == "fsdp"
    bare = prepare_config(cfglib.load(repo_root / "tests/configs/toy.yaml"), JobSpec(cpu=True))
    assert bare.callbacks.preemption._target_ == "icp.cluster.preemption.PreemptionCheckpoint"
    assert "--gpus-per-node" not in render_script(bare, repo_root / "x", JobSpec(cpu=True))
    with pytest.raises(ConfigError, match="--time"):
        prepare_config(cfg, JobSpec(time="soon"))


# --------------------------------------------------------------- preemption, in one process


@pytest.mark.parametrize("stop", [6, 7], ids=["mid-epoch", "epoch-end"])
def test_preempted_run_resumes_bit_identical(repo_root, tmp_path, monkeypatch, stop):
    """SIGUSR1 during step `stop` -> last.ckpt at that step; the rerun ends where a straight run does.

    7 batches per epoch: step 6 stops mid-epoch (loader position and deferred RNG restore matter),
    step 7 at the epoch end. The task adds RNG noise and steps an LR scheduler.
    """
    monkeypatch.chdir(tmp_path)
    base = ["model.step_seconds=0.0", "trainer.max_steps=10"]

    def load(*extra):
        return cfglib.load(repo_root / TOY, base + list(extra))

    before = signal.getsignal(signal.SIGUSR1)
    straight = fit(load("run.name=straight"))
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler lives only as long as fit
    signalled = ["run.name=pre", f"+callbacks.kill={{_target_: tests.toy_slurm.SignalAtStep, step: {stop}}}"]
    pre = fit(load(*signalled))
    assert ckpt(pre)["global_step"] == stop  # stopped right there, not at max_steps
    assert curve(pre)["loss"] == curve(straight)["loss"][:stop]
    fit(load(*signalled))  # same command again: resumes from last.ckpt
    same_state(ckpt(straight), ckpt(pre))
    assert curve(pre) == {"start_step": stop, "loss": curve(straight)["loss"][stop:]}


# ------------------------------------------------------------------------- a real Slurm


@pytest.mark.slurm
def test_slurm_requeue_resumes_to_the_same_weights(slurm_cluster, repo_root, tmp_path, monkeypatch, capsys):
    """Two jobs; one gets USR1 mid-run, checkpoints, requeues itself and finishes like the other."""
    cluster = slurm_cluster
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    setup = f"export PATH={sys.executable.rsplit('/', 1)[0]}:$PATH PYTHONPATH={repo_root} HF_HUB_OFFLINE=1"
    jobs = {}
    for name in ("straight", "pre"):
        assert main(["slurm", "submit", str(repo_root / TOY), f"run.name={name}", "trainer.max_steps=20",
                     "model.step_seconds=0.3", "--cpu", "--gpus-per-node", "1", "--cpus-per-task", "1",
                     "--env-setup", setup]) == 0
        jobs[name] = re.search(r"submitted job (\d+)", capsys.readouterr().out).group(1)
    runs = tmp_path / "runs/slurm_toy"
    assert (runs / "pre/job.sbatch").is_file() and (runs / "pre/config.yaml").is_file()
    pre = jobs["pre"]

    # Signal once training is under way (the first periodic checkpoint exists).
    deadline = time.monotonic() + 120
    while not (runs / "pre/checkpoints/step00000005.ckpt").exists():
        assert time.monotonic() < deadline and cluster.job_field(pre, "JobState") in ("PENDING", "RUNNING"), \
            cluster.logs() + (runs / "pre/logs").joinpath(f"slurm-{pre}.out").read_text()
        time.sleep(0.3)
    cluster.run("scancel", "--signal=USR1", pre)  # to the job step's tasks, as --signal=USR1@90 does

    # The job requeues itself; Slurm holds a requeued job for a while (BeginTime): start it now.
    deadline = time.monotonic() + 60
    while cluster.job_field(pre, "Restarts") != "1" or cluster.job_field(pre, "JobState") != "PENDING":
        assert time.monotonic() < deadline, f"job {pre} was not requeued:\n{cluster.logs()}"
        time.sleep(0.3)
    # slurmd refuses a relaunch whose credential is from the same second as the kill's revocation
    # ("Job credential revoked"); a real cluster's BeginTime hold is far longer than this.
    time.sleep(2.5)
    cluster.run("scontrol", "update", f"JobId={pre}", "StartTime=now")
    for job in jobs.values():
        assert cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"), 150) == "COMPLETED", cluster.logs()

    log = (runs / f"pre/logs/slurm-{pre}.out").read_text()
    saved_at = int(re.search(r"preemption signal: saved \S+ at step (\d+)", log).group(1))
    assert 5 <= saved_at < 20 and "restart 1" in log and "resuming" in log and "from last.ckpt" in log
    same_state(ckpt(runs / "straight"), ckpt(runs / "pre"))
    assert ckpt(runs / "pre")["global_step"] == 20
    assert curve(runs / "pre") == {"start_step": saved_at, "loss": curve(runs / "straight")["loss"][saved_at:]}


def test_a_failed_requeue_fails_the_job(repo_root, tmp_path, monkeypatch, capsys):
    """`scontrol requeue` refused: the state is saved, but the task exits non-zero (Slurm: FAILED),
    never 0 (COMPLETED) with its training unfinished."""
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho 'scontrol: error: Requeue not allowed' >&2\nexit 1\n")
    (fake / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    rc = main(["fit", str(repo_root / TOY), "model.step_seconds=0.0", "trainer.max_steps=10", "run.name=refused",
               "+callbacks.kill={_target_: tests.toy_slurm.SignalAtStep, step: 4}"])
    err = capsys.readouterr().err
    assert rc == 2 and "scontrol requeue` failed" in err and "preempted at step 4" in err
    assert ckpt(tmp_path / "runs/slurm_toy/refused")["global_step"] == 4
