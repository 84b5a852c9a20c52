"""Sweeps (issue 28): `icp fit CONFIG -m key=a,b ...` runs the grid locally, `icp slurm submit -m`
submits one job array; both write the sweep manifest the leaderboard reads."""

import json
import os
import re
import subprocess
import sys

import pytest

from icp.cli import main
from icp.core import sweep as sweeplib
from icp.core.errors import ConfigError
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

TOY = "tests/configs/toy.yaml"


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --------------------------------------------------------------------------------- the grid


def test_axes_are_comma_lists_outside_brackets():
    s = sweeplib.parse("c.yaml", ["model.hidden=4,8", "seed=0,1,2", "trainer.max_steps=2",
                                  "+model.extra=[1,2]", "+callbacks.x={a: 1, b: 2}"])
    assert s.axes == {"model.hidden": ["4", "8"], "seed": ["0", "1", "2"]}
    assert s.fixed == ["trainer.max_steps=2", "+model.extra=[1,2]", "+callbacks.x={a: 1, b: 2}"]
    assert len(s.points) == 6
    assert s.points[1] == s.fixed + ["model.hidden=4", "seed=1"]  # the last axis varies fastest
    # The id follows from the command: the same sweep again resumes the same manifest.
    assert s.sweep_id == sweeplib.parse("c.yaml", ["model.hidden=4,8", "seed=0,1,2", "trainer.max_steps=2",
                                                   "+model.extra=[1,2]", "+callbacks.x={a: 1, b: 2}"]).sweep_id
    assert s.sweep_id != sweeplib.parse("c.yaml", ["model.hidden=4,8", "seed=0,1"]).sweep_id


@pytest.mark.parametrize("override, message", [
    ("model.name='a,b'", "comma inside quotes"),
    ("model.name=a,b c", "must be non-empty letters"),
    ("model.name=a,", "must be non-empty letters"),
    ("model.name=a,$(rm -rf x)", "must be non-empty letters"),
    ("model.name=a\nb,c", "line break"),
    ("model.name=a,a", "listed twice"),
    ("seed=range(0,3)", "range"),
    ("run.name=a,b", "cannot be swept"),
    ("experiment=a,b", "cannot be swept"),
    ("security.allowed_targets=os,sys", "cannot be swept"),
    ("no equals sign", "not key=value"),
])
def test_bad_sweep_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        sweeplib.parse("c.yaml", [override])


def test_grid_size_is_limited():
    values = ",".join(str(i) for i in range(17))
    with pytest.raises(ConfigError, match=r"289 points \(17 x 17\); at most 256"):
        sweeplib.parse("c.yaml", [f"a={values}", f"b={values}"])
    with pytest.raises(ConfigError, match="given twice"):
        sweeplib.parse("c.yaml", ["a=1,2", "+a=3"])


def test_points_that_share_a_run_directory_are_refused(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="one run directory.*run.name"):
        sweeplib.plan(str(repo_root / TOY), ["run.name=fixed", "model.hidden=4,8"])
    with pytest.raises(ConfigError, match="trainer.max_steps"):  # not part of a run's identity
        sweeplib.plan(str(repo_root / TOY), ["trainer.max_steps=2,4"])
    assert files_under(tmp_path) == []


# ----------------------------------------------------------------------------- local sweep


def test_local_sweep_runs_every_point_into_its_own_run_dir(repo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", str(repo_root / TOY), "-m", "model.hidden=4,8", "seed=0,1", "trainer.max_steps=1"]
    assert main([*args, "--dry-run"]) == 0
    assert files_under(tmp_path) == []  # a dry run creates nothing
    assert main(args) == 0
    out = capsys.readouterr().out
    manifests = list(tmp_path.glob("runs/toy/sweeps/sweep-*/sweep.json"))
    assert len(manifests) == 1 and f"sweep manifest {manifests[0].relative_to(tmp_path)}" in out
    m = json.loads(manifests[0].read_text())
    assert set(m) == {"schema", "config", "axes", "points"} and m["schema"] == "icp-sweep/1"
    assert m["config"] == str(repo_root / TOY) and m["axes"] == {"model.hidden": ["4", "8"], "seed": ["0", "1"]}
    assert [p["overrides"][-2:] for p in m["points"]] == [
        ["model.hidden=4", "seed=0"], ["model.hidden=4", "seed=1"], ["model.hidden=8", "seed=0"], ["model.hidden=8", "seed=1"]]
    dirs = [tmp_path / p["run_dir"] for p in m["points"]]
    assert len(set(dirs)) == 4 and all((d / "checkpoints/last.ckpt").is_file() for d in dirs)
    assert "hidden: 8" in (dirs[3] / "config.yaml").read_text() and "seed: 1" in (dirs[3] / "config.yaml").read_text()
    # The same command again: every point is already done, nothing is added.
    before = files_under(tmp_path)
    assert main(args) == 0
    assert capsys.readouterr().out.count("already done at step 1") == 4
    assert files_under(tmp_path) == before


# ------------------------------------------------------------------------------ Slurm array


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/sbatch.args\"\necho 4242\n")
    (bin_dir / "srun").write_text("#!/bin/sh\necho \"srun $*\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def test_slurm_sweep_is_one_job_array_whose_tasks_pick_their_point(repo_root, tmp_path, monkeypatch, capsys,
                                                                    fake_sbatch):
    monkeypatch.chdir(tmp_path)
    args = ["slurm", "submit", str(repo_root / TOY), "-m", "model.hidden=4,8", "seed=0,1", "trainer.max_steps=2",
            "--cpu", "--gpus-per-node", "2"]
    assert main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "#SBATCH --array=0-3\n" in dry and not (tmp_path / "runs").exists()
    assert main(args) == 0
    assert "submitted job array 4242" in capsys.readouterr().out
    folder = next((tmp_path / "runs/toy/sweeps").iterdir())
    script = (folder / "job.sbatch").read_text()
    assert script == dry.split("# sweep folder:")[0]
    assert f"#SBATCH --output={folder.relative_to(tmp_path)}/logs/slurm-%j.out" in script
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=USR1@90" in script
    m = json.loads((folder / "sweep.json").read_text())
    runs = [p["run_dir"] for p in m["points"]]
    assert all((tmp_path / r / "config.yaml").is_file() for r in runs)
    assert "devices: 2" in (tmp_path / runs[0] / "config.yaml").read_text()  # the allocation's layout
    assert (fake_sbatch / "sbatch.args").read_text().split() == ["--parsable", str((folder / "job.sbatch").relative_to(tmp_path))]
    # Each task of the array runs its own point's saved config (srun replaced by an echo).
    for task in (0, 3):
        env = dict(os.environ, SLURM_SUBMIT_DIR=str(tmp_path), SLURM_ARRAY_TASK_ID=str(task),
                   SLURM_ARRAY_JOB_ID="4242", SLURM_JOB_ID=str(5000 + task))
        done = subprocess.run(["bash", str(folder / "job.sbatch")], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert re.search(rf"srun --kill-on-bad-exit=1 .* fit {re.escape(runs[task])}/config.yaml$", done.stdout, re.M)
    # The same run directories as a local sweep of the same grid: one identity per point.
    local = sweeplib.plan(str(repo_root / TOY), ["model.hidden=4,8", "seed=0,1", "trainer.max_steps=2"])
    assert [d.as_posix() for d in local.run_dirs] == runs


def test_a_sweep_point_with_missing_data_submits_nothing(repo_root, tmp_path, monkeypatch, capsys, fake_sbatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["slurm", "submit", str(repo_root / "experiments/stitching/tiny.yaml"), "-m", "seed=0,1", "--cpu"])
    assert rc == 2 and "data.shards: shard folder data_shards/synth/train does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (fake_sbatch / "sbatch.args").exists()


@pytest.mark.slurm
def test_a_real_slurm_job_array_trains_every_point(slurm_cluster, repo_root, tmp_path, monkeypatch, capsys):
    import torch

    cluster = slurm_cluster
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    setup = f"export PATH={sys.executable.rsplit('/', 1)[0]}:$PATH PYTHONPATH={repo_root} HF_HUB_OFFLINE=1"
    assert main(["slurm", "submit", str(repo_root / "tests/configs/slurm_toy.yaml"), "-m", "seed=0,1",
                 "trainer.max_steps=3", "model.step_seconds=0.0", "--cpu", "--gpus-per-node", "1",
                 "--cpus-per-task", "1", "--env-setup", setup]) == 0
    job = re.search(r"submitted job array (\d+)", capsys.readouterr().out).group(1)
    for task in (0, 1):
        assert cluster.wait_state(f"{job}_{task}", ("COMPLETED", "FAILED", "CANCELLED"), 120) == "COMPLETED", \
            cluster.logs()
    m = json.loads(next(tmp_path.glob("runs/slurm_toy/sweeps/*/sweep.json")).read_text())
    for point in m["points"]:
        last = torch.load(tmp_path / point["run_dir"] / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
        assert last["global_step"] == 3
