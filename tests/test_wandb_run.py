"""W&B for `icp run` (issue 28): the stages of one run in one group with their job type, offline by
default, online with one switch (refused without an API key before anything is made), and offline
folders that `wandb sync` takes."""

import subprocess
import sys
from pathlib import Path

import pytest

from icp import cli
from icp.core import config as cfglib
from icp.jobs import run as mainjob
from tests.wandb_records import complete_records, history, run_record

ROOT = Path(__file__).resolve().parents[1]
FITS = ("embedder", "probe", "stitching", "adaptation")


def fit_jobs(*overrides):
    jobs = mainjob.plan(cfglib.load(ROOT / "experiments/quickstart.yaml", list(overrides)))
    return {n: j for n, j in jobs.items() if j.kind == "fit"}


def test_every_stage_logs_offline_in_the_runs_group_with_its_job_type():
    jobs = fit_jobs()
    assert set(jobs) == set(FITS)
    for name, job in jobs.items():
        wb = job.cfg.logger.wandb
        assert (wb.group, wb.job_type, wb.mode, wb.project) == ("quickstart/main", name, "offline", "icp"), name


def test_one_switch_sets_every_stage_and_keeps_its_trained_directory():
    offline, online, off = fit_jobs(), fit_jobs("wandb=online"), fit_jobs("wandb=disabled")
    for name in FITS:
        assert online[name].cfg.logger.wandb.mode == "online"
        assert off[name].cfg.logger.wandb is None
        # where a stage is logged is not what it computes: no stage trains again for the switch
        assert offline[name].run_dir == online[name].run_dir == off[name].run_dir, name


def test_a_stage_switched_off_stays_off():
    jobs = fit_jobs("wandb=online", "embedder.overrides=[model.num_identities=8,logger.wandb=null]")
    assert jobs["embedder"].cfg.logger.wandb is None and jobs["probe"].cfg.logger.wandb.mode == "online"


def test_an_unknown_switch_is_one_line_naming_the_choices(capsys):
    assert cli.main(["run", str(ROOT / "experiments/quickstart.yaml"), "wandb=maybe", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "offline, online, disabled" in err and "Traceback" not in err


def test_online_without_an_api_key_is_refused_before_anything_is_made(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no `wandb login` entry either
    args = ["run", str(ROOT / "tests/configs/quickstart_ci.yaml"), "wandb=online", f"run.root={tmp_path}/runs",
            f"data.out={tmp_path}/shards"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "WANDB_API_KEY" in err and "wandb sync" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "shards").exists()
    # the key (or a netrc entry) is all it needs
    cfg = cfglib.load(ROOT / "tests/configs/quickstart_ci.yaml", ["wandb=online"])
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert mainjob.wandb_settings(cfg, mainjob.plan(cfg))["mode"] == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    assert mainjob.wandb_settings(cfg, mainjob.plan(cfg))["mode"] == "online"


TINY = """extends: {ci}
data: {{identities: 4, heldout_identities: 2, views: 2}}
embedder:
  overrides:
    - model.num_identities=${{data.identities}}
    - model.input_size=${{data.resolution}}
    - trainer.max_steps=2
    - trainer.val_check_interval=2
    - data.batch_size=4
    - data.num_workers=0
"""


def test_a_real_stage_logs_into_the_group_and_wandb_sync_takes_its_folder(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(ci=ROOT / "tests/configs/quickstart_ci"))
    assert cli.main(["run", str(config), "--until", "embedder", f"run.root={tmp_path}/runs",
                     f"data.out={tmp_path}/shards"]) == 0
    folders = sorted((tmp_path / "runs/quickstart/main/stages").glob("embedder/cfg-*/wandb/offline-run-*"))
    assert len(folders) == 1
    recs = complete_records(folders[0])
    run = run_record(recs)
    assert (run.run_group, run.job_type, run.project) == ("quickstart/main", "embedder", "icp")
    assert any("val/verif_auc" in row for row in history(recs))  # the stage's metrics, in the file sync uploads
    # the README's command, as far as it goes without a network: `wandb sync` finds the run to upload
    listed = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", *map(str, folders)],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "Would sync 1 run" in listed.stdout + listed.stderr, listed


@pytest.mark.parametrize("value", ["false", "null"])
def test_false_or_null_switches_wandb_off(value):
    jobs = fit_jobs(f"wandb={value}")
    assert all(j.cfg.logger.wandb is None for j in jobs.values())
