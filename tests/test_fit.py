"""`icp fit`: run directories, resume, refusal to overwrite, checkpoint integrity."""

import pytest
import torch

from icp.core import config as cfglib
from icp.core.checkpointing import checkpoint_problem, resumable_checkpoint
from icp.core.errors import ConfigError
from icp.jobs.fit import fit


@pytest.fixture
def toy(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def load(*overrides):
        return cfglib.load(repo_root / "tests/configs/toy.yaml", overrides)
    return load


def weights(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def test_fit_writes_run_dir_and_resumes_to_the_same_weights(toy, tmp_path):
    straight = fit(toy("run.name=straight", "trainer.max_steps=6"))
    assert (straight / "config.yaml").is_file() and (straight / "logs/csv/version_0/metrics.csv").is_file()
    assert sorted(p.name for p in (straight / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt", "step00000003.ckpt", "step00000006.ckpt"]
    # Interrupted run: 3 steps, then the same command with more steps resumes from step 3.
    fit(toy("run.name=resumed", "trainer.max_steps=3"))
    resumed = fit(toy("run.name=resumed", "trainer.max_steps=6"))  # max_steps is not a config change
    a, b = weights(straight / "checkpoints/last.ckpt"), weights(resumed / "checkpoints/last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "max_steps: 6" in (resumed / "config.yaml").read_text() and not list(resumed.glob("config.*.yaml"))
    assert (resumed / "logs/csv/version_0/metrics.csv").is_file()  # and so are the earlier logs
    assert (resumed / "logs/csv/version_1/metrics.csv").is_file()


def test_same_name_with_a_different_config_is_refused(toy):
    fit(toy("run.name=x", "trainer.max_steps=1"))
    with pytest.raises(ConfigError, match="different config.*model.hidden"):
        fit(toy("run.name=x", "trainer.max_steps=1", "model.hidden=4"))
    changed = fit(toy("run.name=x", "trainer.max_steps=1", "model.hidden=4", "run.allow_config_change=true",
                      "run.restart=true"))
    assert (changed / "config.0.yaml").is_file()  # the earlier config is kept, not overwritten


def test_unnamed_runs_are_named_by_config_hash(toy):
    assert fit(toy("trainer.max_steps=1")) == fit(toy("trainer.max_steps=1"))
    assert fit(toy("trainer.max_steps=1")) != fit(toy("trainer.max_steps=1", "model.hidden=4"))


def test_truncated_checkpoint_is_skipped_for_the_previous_one(toy):
    run = fit(toy("run.name=t", "trainer.max_steps=6"))
    last = run / "checkpoints/last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    assert "not a complete checkpoint" in checkpoint_problem(last)
    assert resumable_checkpoint(run / "checkpoints").name == "step00000006.ckpt"
    flipped = run / "checkpoints/step00000006.ckpt"
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    assert checkpoint_problem(flipped) is not None
    assert resumable_checkpoint(run / "checkpoints").name == "step00000003.ckpt"
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_the_final_step_is_checkpointed_off_the_save_cadence(toy):
    run = fit(toy("run.name=odd", "trainer.max_steps=4"))  # saves every 3 steps
    assert torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4


def test_wandb_offline_run_lives_in_the_run_dir_and_is_closed(toy):
    import wandb

    run = fit(toy("run.name=wb", "trainer.max_steps=2", "+logger.wandb={mode: offline, project: icp-test}"))
    assert wandb.run is None  # closed: the next fit in this process gets its own W&B run
    offline = list((run / "wandb").glob("offline-run-*"))
    from icp.jobs.fit import wandb_run_id

    assert len(offline) == 1 and offline[0].name.endswith(wandb_run_id(run))  # stable id: resumes append


def step_of(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_the_resume_point_is_the_newest_by_global_step_whatever_its_name(toy):
    """A stale last.ckpt (e.g. a preemption file) never wins over a newer state under another name."""
    import shutil

    from icp.core.checkpointing import checkpoint_step

    run = fit(toy("run.name=names", "trainer.max_steps=6"))
    ckpts = run / "checkpoints"
    shutil.copy(ckpts / "last.ckpt", ckpts / "last-v1.ckpt")   # step 6 under another name
    shutil.copy(ckpts / "step00000003.ckpt", ckpts / "last.ckpt")  # newest mtime, older state
    assert checkpoint_step(ckpts / "last.ckpt") == 3
    chosen = resumable_checkpoint(ckpts)
    assert step_of(chosen) == 6
    from icp.tasks.loading import locate_run

    assert step_of(locate_run(run)[1]) == 6  # icp generate / icp eval / appearance_from: the same rule


def test_all_checkpoints_corrupt_is_an_error_not_a_silent_restart(toy):
    from icp.core.errors import WeightsError

    run = fit(toy("run.name=allbad", "trainer.max_steps=6"))
    for path in (run / "checkpoints").glob("*.ckpt"):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match=r"no intact checkpoint.*last\.ckpt.*step00000006\.ckpt.*run\.restart=true"):
        fit(toy("run.name=allbad", "trainer.max_steps=6"))
    again = fit(toy("run.name=allbad", "trainer.max_steps=3", "run.restart=true", "run.allow_config_change=true"))
    assert step_of(again / "checkpoints/last.ckpt") == 3
    assert len(list((again / "checkpoints/old-0").glob("*.ckpt"))) == 3  # kept, out of the way
    assert "restart: false" in (again / "config.yaml").read_text()  # a requeue resumes, never restarts again


def test_keep_last_holds_after_a_corruption_fallback(toy):
    run = fit(toy("run.name=keep", "trainer.max_steps=9", "checkpoint.keep_last=2"))
    ckpts = run / "checkpoints"
    for name in ("last.ckpt", "step00000009.ckpt"):
        raw = bytearray((ckpts / name).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (ckpts / name).write_bytes(bytes(raw))
    assert resumable_checkpoint(ckpts).name == "step00000006.ckpt"
    fit(toy("run.name=keep", "trainer.max_steps=15", "checkpoint.keep_last=2", "run.allow_config_change=true"))
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step00000012.ckpt", "step00000015.ckpt"]
    assert sorted(p.name for p in (ckpts / "corrupt").iterdir()) == ["last.ckpt", "step00000009.ckpt"]
    assert step_of(ckpts / "last.ckpt") == 15
