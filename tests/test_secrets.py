"""Secrets in the environment (W&B key, *_TOKEN, *_KEY) never reach run directories, W&B's
offline files, logs or sbatch scripts; planted values are grepped for in everything written."""

import os
from pathlib import Path

import pytest

from icp.core import config as cfglib
from icp.cli import main
from icp.core.errors import ConfigError
from icp.core.secrets import is_secret_name, leaks, redact, redact_tree, secret_values
from icp.jobs.fit import fit

PLANTED = {
    "ICP_TEST_API_KEY": "sk-planted-7f3a9c1e5b2d4f60",
    "WANDB_API_KEY": "wandbplanted" + "0123456789abcdef" * 2,
    "HF_TOKEN": "hf_plantedTOKEN4242xyz",
    "DB_PASSWORD": "pw-planted-hunter2",
}


@pytest.fixture
def planted(monkeypatch, tmp_path):
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return PLANTED


def grep_tree(root: Path) -> dict[str, list[str]]:
    """{file: names of planted secrets found in it} for every file under ``root``."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits = [n for n, v in PLANTED.items() if v.encode() in data]
            if hits:
                found[str(path.relative_to(root))] = hits
    return found


def test_names_values_and_redaction():
    env = {**PLANTED, "TOKENIZERS_PARALLELISM": "false", "HOME": "/home/someone", "SHORT_KEY": "abc",
           "KEYBOARD": "a-long-layout-name"}
    assert set(secret_values(env).values()) == set(PLANTED)  # short values and look-alike names are not secrets
    assert all(is_secret_name(n) for n in ("AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "api_key", "SMTP_PASSWORD"))
    text = f"key={PLANTED['WANDB_API_KEY']} tok={PLANTED['HF_TOKEN']} home=/home/someone"
    out = redact(text, env)
    assert not leaks(out, env) and "<redacted:WANDB_API_KEY>" in out and "home=/home/someone" in out
    assert leaks(text, env) == ["HF_TOKEN", "WANDB_API_KEY"]
    tree = redact_tree({"a": [PLANTED["DB_PASSWORD"], 3], PLANTED["HF_TOKEN"]: {"b": "ok"}}, env)
    assert tree == {"a": ["<redacted:DB_PASSWORD>", 3], "<redacted:HF_TOKEN>": {"b": "ok"}}


def test_fit_with_wandb_leaks_no_secret(planted, repo_root, tmp_path, capfd):
    cfg = cfglib.load(repo_root / "tests/configs/toy.yaml",
                      ["run.name=secrets", "trainer.max_steps=2", "+logger.wandb={mode: offline}"])
    run = fit(cfg)
    assert (run / "wandb").is_dir() and (run / "config.yaml").is_file()
    out, err = capfd.readouterr()
    assert grep_tree(run) == {} and not leaks(out + err)
    # A config cannot copy a secret out of the environment (icp.core.config refuses the interpolation).
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        cfglib.load(repo_root / "tests/configs/toy.yaml", ["+notes=${oc.env:WANDB_API_KEY}"])


def test_wandb_config_is_redacted(planted, repo_root, monkeypatch):
    """What icp hands to W&B itself (the resolved config) is scrubbed even if a value matches a key."""
    from icp.jobs.fit import build_loggers

    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr("lightning.pytorch.loggers.WandbLogger", Recorder)
    with pytest.raises(ConfigError, match="ICP_TEST_API_KEY"):  # first line of defence: refused at load
        cfglib.load(repo_root / "tests/configs/toy.yaml", [f"+notes={PLANTED['ICP_TEST_API_KEY']}"])
    cfg = cfglib.load(repo_root / "tests/configs/toy.yaml", ["+logger.wandb={mode: offline}"])
    cfg.notes = PLANTED["ICP_TEST_API_KEY"]  # one that got in some other way is still scrubbed
    build_loggers(cfg, Path("runs/x"))
    assert seen["config"]["notes"] == "<redacted:ICP_TEST_API_KEY>" and not leaks(str(seen))


def test_sbatch_scripts_hold_no_secret(planted, repo_root, tmp_path, capsys, monkeypatch):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 4242\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    config = str(repo_root / "tests/configs/slurm_toy.yaml")
    assert main(["slurm", "submit", config, "run.name=s", "--cpu", "--env-setup", "source .venv/bin/activate"]) == 0
    run = tmp_path / "runs" / "slurm_toy" / "s"
    assert (run / "job.sbatch").is_file() and grep_tree(run) == {}
    # A key pasted into --env-setup would be written into job.sbatch: refused in one line instead.
    line = f"export WANDB_API_KEY={PLANTED['WANDB_API_KEY']}"
    assert main(["slurm", "submit", config, "run.name=t", "--cpu", "--dry-run", "--env-setup", line]) == 2
    captured = capsys.readouterr()
    assert "WANDB_API_KEY" in captured.err and not leaks(captured.out + captured.err)
    assert not (tmp_path / "runs" / "slurm_toy" / "t").exists()
