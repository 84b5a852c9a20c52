"""Every experiment config composes, validates, and (where complete) builds data, task and trainer."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from icp.core import config as cfglib
from icp.jobs.fit import build

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "experiments").rglob("*.yaml"))
# Shared by experiments (`defaults: [...]`), not runnable alone: base.yaml and the included nodes (perf/).
FRAGMENTS = {Path("experiments/base.yaml"), *(p for p in CONFIGS if p.parts[1] == "perf")}
# `icp run` configs: stages of `icp fit` configs
PIPELINES = {Path("experiments/quickstart.yaml"), Path("experiments/portrait64.yaml")}


def test_there_are_experiments():
    assert len(CONFIGS) > len(FRAGMENTS)


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_composes_and_validates(path):
    cfg = cfglib.load(ROOT / path)
    if path in FRAGMENTS:
        return
    if path in PIPELINES:
        from icp.jobs.run import FITS, check

        if "pretrain" in cfg and "pretrain" not in FITS:  # issue 30; test_correspondence.py checks the stages
            pytest.xfail("icp/jobs/run.py has no pretrain stage yet")
        check(cfg)  # every stage's experiment + overrides composes and validates
        return
    for node in ("data", "model", "trainer"):
        assert node in cfg, f"{path} has no '{node}' node"
        cfglib.validate(cfg[node], cfg, node)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p not in FRAGMENTS | PIPELINES], ids=str)
def test_config_instantiates_on_cpu(path, tmp_path, monkeypatch):
    cfg = cfglib.load(ROOT / path, ["trainer.accelerator=cpu", "trainer.devices=1"])
    if OmegaConf.missing_keys(cfg):
        pytest.skip(f"{path} needs {sorted(OmegaConf.missing_keys(cfg))} (real weights); validated only")
    monkeypatch.chdir(tmp_path)
    datamodule, model, trainer = build(cfg, tmp_path / "run")
    assert trainer.max_steps == cfg.trainer.max_steps
    assert sum(p.numel() for p in model.parameters()) > 0
