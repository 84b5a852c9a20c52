"""`icp fit` (issue 28): checks before anything is made, a no-op re-run adds nothing, a run's identity
survives max_steps and the device count, a progress bar by global step with ETA."""

import csv
import re
import time

import pytest

from icp.cli import main
from icp.core import rundir
from icp.core.errors import ConfigError
from icp.jobs.fit import fit
from tests.test_fit import step_of, toy  # noqa: F401  (toy: the fixture)


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ------------------------------------------------------------------ checks before anything is made


@pytest.mark.parametrize("dry_run", [False, True])
def test_missing_shards_fail_at_once_and_create_nothing(repo_root, tmp_path, monkeypatch, capsys, dry_run):
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    rc = main(["fit", str(repo_root / "experiments/stitching/tiny.yaml"), *(["--dry-run"] if dry_run else [])])
    took = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert rc == 2 and took < 10, (rc, took, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "data.shards: shard folder data_shards/synth/train does not exist" in err and "icp shards synth" in err
    assert files_under(tmp_path) == []  # no run directory, no wandb folder


def test_a_shard_folder_with_a_missing_shard_is_named(repo_root, tmp_path, monkeypatch, capsys):
    from icp.data.shards.write import synth

    monkeypatch.chdir(tmp_path)
    synth(tmp_path / "train", identities=2, views=2, resolution=16, shard_size=1)
    (tmp_path / "train/shard-000001.tar").unlink()
    rc = main(["fit", str(repo_root / "experiments/stitching/tiny.yaml"), "data.shards=train", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.shards: 1 shard(s) listed in train/manifest.json are missing" in err
    assert not (tmp_path / "runs").exists()


def test_a_target_outside_the_allow_list_is_refused_before_the_run_dir(toy, tmp_path, capsys, repo_root):
    rc = main(["fit", str(repo_root / "tests/configs/toy.yaml"), "+callbacks.bad={_target_: os.system}"])
    assert rc == 2 and "os.system" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not accepted by"):
        fit(toy("+model.no_such_key=1"))  # a key the task does not take: no run dir either
    assert not (tmp_path / "runs").exists()


def test_wandb_online_without_a_key_is_refused_before_the_run_dir(toy, tmp_path, capsys, repo_root, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login either
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    rc = main(["fit", str(repo_root / "tests/configs/toy.yaml"), "logger.wandb={mode: online, project: icp}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "WANDB_API_KEY" in err, err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------ a no-op adds nothing


def test_a_finished_run_run_again_adds_nothing(toy, tmp_path, repo_root, capsys):
    args = ["fit", str(repo_root / "tests/configs/toy.yaml"), "trainer.max_steps=2",
            "+logger.wandb={mode: offline, project: icp-test}"]
    assert main(args) == 0
    run = next((tmp_path / "runs/toy").iterdir())
    before = files_under(run)
    assert any(p.startswith("wandb/offline-run-") for p in before)
    capsys.readouterr()
    assert main(args) == 0
    assert "already done at step 2" in capsys.readouterr().out
    assert files_under(run) == before  # no W&B folder, CSV version or config.N.yaml


# ----------------------------------------------------------------------------- run identity


def test_raising_max_steps_continues_the_same_run(toy, capsys):
    run = fit(toy("trainer.max_steps=4"))
    capsys.readouterr()
    longer = fit(toy("trainer.max_steps=6"))
    out = capsys.readouterr().out
    assert longer == run and f"resuming {run} from last.ckpt" in out
    assert step_of(run / "checkpoints/last.ckpt") == 6
    assert sorted(p.name for p in (run / "logs/csv").iterdir()) == ["version_0", "version_1"]
    with open(run / "logs/csv/version_1/metrics.csv") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh)]
    assert steps == [4, 5]  # optimizer steps 5 and 6 (CSV step g-1): resumed at 4, not from 0
    assert not list(run.glob("config.*.yaml"))  # not a config change


def test_the_device_count_does_not_change_the_run_dir(toy):
    one = toy("trainer.devices=1")
    many = toy("trainer.devices=8", "+trainer.num_nodes=2", "+trainer.strategy=ddp", "trainer.accelerator=gpu")
    assert rundir.run_dir_of(one) == rundir.run_dir_of(many)
    online = toy("+logger.wandb={mode: online, project: p}", "trainer.enable_progress_bar=true")
    assert rundir.run_dir_of(online) == rundir.run_dir_of(one)  # where metrics go is not what runs
    # With the global batch fixed, the per-device batch and accumulation only split it over processes.
    a = toy("+global_batch_size=32", "data.batch_size=8", "+trainer.accumulate_grad_batches=4")
    b = toy("+global_batch_size=32", "data.batch_size=4", "trainer.devices=8")
    assert rundir.run_dir_of(a) == rundir.run_dir_of(b)
    # Without it, the per-device batch is the optimizer's batch: another run.
    assert rundir.run_dir_of(toy("data.batch_size=4")) != rundir.run_dir_of(toy("data.batch_size=8"))
    assert rundir.run_dir_of(toy("model.hidden=4")) != rundir.run_dir_of(one)


def test_a_run_trained_on_one_device_continues_on_two(toy):
    run = fit(toy("trainer.max_steps=2", "run.name=devices"))
    again, changed = rundir.changed_keys(toy("trainer.max_steps=4", "run.name=devices", "trainer.devices=2",
                                             "+trainer.strategy=ddp"))
    assert again == run and changed == []  # not refused as a different config


# ------------------------------------------------------------------------------ progress bar


def test_progress_bar_counts_global_steps_with_eta_and_starts_at_the_resumed_step(toy, capsys):
    fit(toy("trainer.max_steps=3", "trainer.enable_progress_bar=true"))
    first = capsys.readouterr().err
    assert re.search(r"step 3/3 100%\|.*ETA", first) and "Epoch" not in first
    fit(toy("trainer.max_steps=5", "trainer.enable_progress_bar=true"))
    second = capsys.readouterr().err
    shown = re.findall(r"step (\d+)/5", second)
    assert shown[0] == "3" and shown[-1] == "5", second  # starts at the resumed step, ends at max_steps
    assert re.search(r"step 5/5 100%\|.*elapsed, ETA 00:00, [\d.]+ ?\w*step/s", second)


def test_progress_bar_without_max_steps_counts_without_a_total(toy, capsys):
    fit(toy("trainer.max_steps=-1", "+trainer.max_epochs=1", "trainer.enable_progress_bar=true"))
    err = capsys.readouterr().err
    assert "step 3 [" in err and "Epoch" not in err  # 24 items / batch 8: one epoch = 3 steps
