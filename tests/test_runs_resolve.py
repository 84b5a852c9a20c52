"""icp.core.runs.resolve: every run directory a verb may get names its checkpoint, config, metrics,
held-out shards and embedder (issue 28); anything else is one line saying what was expected."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from icp.core.errors import ConfigError, WeightsError
from icp.core.runs import resolve


def fit_run(root, experiment, name, steps=(1,), extra=None):
    """A run as `icp fit` leaves it: config.yaml (run.root relative, as the main job writes it) and
    Lightning-style checkpoints holding their global_step."""
    run = root / experiment / name
    (run / "checkpoints").mkdir(parents=True)
    cfg = {"experiment": experiment, "run": {"root": str(root)}, "data": {"resolution": 32}, **(extra or {})}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    for step in steps:
        torch.save({"state_dict": {}, "global_step": step}, run / "checkpoints" / f"step{step:06d}.ckpt")
    return run


def main_root(base, rel="runs/quickstart/main"):
    """The main job's root as `icp run` leaves it, with the paths in its files relative to ``base``
    (the folder it ran in), as a real run's are."""
    main = base / rel
    main.mkdir(parents=True)
    (main / "checkpoints").mkdir()  # rundir.prepare makes it, empty
    cfg = {"experiment": "quickstart", "run": {"root": "runs", "name": "main"},
           "data": {"out": "data_shards/qs", "resolution": 32}}
    (main / "config.yaml").write_text(yaml.safe_dump(cfg))
    stages = {}
    for stage in ("embedder", "stitching", "adaptation"):
        extra = {"data": {"resolution": 32, "val_shards": "data_shards/qs/heldout"}}
        if stage == "adaptation":
            extra["callbacks"] = {"eval": {"embedder": f"{rel}/stages/embedder/cfg-e1/embedder.pt"}}
        run = fit_run(main / "stages", stage, {"embedder": "cfg-e1", "stitching": "cfg-s1", "adaptation": "cfg-a1"}[stage],
                      steps=(3, 6), extra=extra)
        # the sub-run's config as runner.fit_config writes it: run.root relative to the job's folder
        saved = yaml.safe_load((run / "config.yaml").read_text())
        saved["run"]["root"] = f"{rel}/stages"
        (run / "config.yaml").write_text(yaml.safe_dump(saved))
        stages[stage] = {"seconds": 1.0, "result": {"run_dir": f"{rel}/stages/{stage}/{run.name}"}}
    (main / "stages" / "embedder" / "cfg-e1" / "embedder.pt").write_bytes(b"x")
    (main / "stages.json").write_text(json.dumps(stages))
    (main / "stages" / "data.json").write_text(json.dumps({"train": "data_shards/qs/train",
                                                           "heldout": "data_shards/qs/heldout", "key": "k"}))
    (base / "data_shards/qs/heldout").mkdir(parents=True)
    (main / "evaluate").mkdir()
    (main / "evaluate" / "metrics.json").write_text("{}")
    return main


def test_fit_run_and_its_checkpoint(tmp_path):
    run = fit_run(tmp_path / "runs", "stitching", "cfg-1", steps=(5, 2))
    info = resolve(run)
    assert info.kind == "fit" and info.root == run and info.model_run == run
    assert info.checkpoint.name == "step000005.ckpt"  # newest by the step stored inside, not the name
    assert info.config == run / "config.yaml" and info.resolution == 32 and info.metrics is None
    given = resolve(run / "checkpoints" / "step000002.ckpt")
    assert given.checkpoint.name == "step000002.ckpt" and given.root == run
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{}")
    assert resolve(run).metrics == run / "eval" / "metrics.json"
    assert resolve(run / "eval" / "metrics.json").root == run


def test_main_job_root_is_its_adaptation_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main_root(tmp_path)
    main = Path("runs/quickstart/main")  # as the README writes it: relative paths stay relative
    info = resolve(main)
    assert info.kind == "main"
    assert info.checkpoint == main / "stages/adaptation/cfg-a1/checkpoints/step000006.ckpt"
    assert info.config == main / "stages/adaptation/cfg-a1/config.yaml"
    assert info.metrics == main / "evaluate/metrics.json" and info.main_config == main / "config.yaml"
    assert info.heldout.resolve() == (tmp_path / "data_shards/qs/heldout").resolve()
    assert info.embedder.resolve() == (main / "stages/embedder/cfg-e1/embedder.pt").resolve()
    # a stage run inside it gets the main job's held-out set and embedder too
    stage = resolve(main / "stages/stitching/cfg-s1")
    assert stage.kind == "fit" and stage.embedder.resolve() == info.embedder.resolve()
    assert stage.heldout.resolve() == info.heldout.resolve()
    # the record of the main job names the same run
    assert resolve(main / "evaluate/metrics.json").root == main


def test_moved_main_root_still_finds_its_data(tmp_path, monkeypatch):
    """The relative paths in a copied root resolve against where the copy sits, not the current folder."""
    main = main_root(tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    info = resolve(main)
    assert info.heldout == tmp_path / "copy/data_shards/qs/heldout"
    assert info.embedder == main / "stages/embedder/cfg-e1/embedder.pt"
    assert resolve(main / "stages/adaptation/cfg-a1").embedder.resolve() == info.embedder.resolve()


def test_claims_sub_run_gets_the_study_embedder(tmp_path):
    root = tmp_path / "pc"
    emb = fit_run(root / "fits", "claims_embedder", "cfg-e")
    (emb / "embedder.pt").write_bytes(b"x")
    adapt = fit_run(root / "fits", "claims_adaptation", "cfg-a",
                    extra={"data": {"resolution": 32, "val_shards": str(tmp_path / "held")}})
    info = resolve(adapt)
    assert info.kind == "claims" and info.embedder == emb / "embedder.pt" and info.heldout == tmp_path / "held"
    (root / "timeline.json").write_text("{}")
    with pytest.raises(ConfigError, match="claims study.*fits/claims_"):
        resolve(root)


def test_a_folder_of_runs_names_them(tmp_path):
    run = fit_run(tmp_path / "runs", "stitching", "cfg-1")
    with pytest.raises(ConfigError, match=f"holds runs: {run}"):
        resolve(tmp_path / "runs" / "stitching")
    with pytest.raises(ConfigError, match=f"holds runs: {run}"):
        resolve(tmp_path / "runs")


def test_no_checkpoint_is_reported_when_needed(tmp_path):
    run = fit_run(tmp_path / "runs", "x", "cfg", steps=())
    info = resolve(run)  # metrics of a fetched root may be read without its checkpoints
    assert info.checkpoint is None
    with pytest.raises(WeightsError, match="no checkpoint"):
        info.need_checkpoint()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"truncated")
    with pytest.raises(WeightsError, match="no intact checkpoint"):
        resolve(run).need_checkpoint()


@pytest.mark.parametrize("make", ["missing", "empty_dir", "text_file", "stray_ckpt"])
def test_anything_else_is_one_line(tmp_path, make):
    path = tmp_path / "thing"
    if make == "empty_dir":
        path.mkdir()
    elif make == "text_file":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    elif make == "stray_ckpt":
        path = tmp_path / "model.ckpt"
        torch.save({"global_step": 1}, path)
    with pytest.raises(ConfigError) as err:
        resolve(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "run directory" in message


def test_unreadable_config_is_one_line(tmp_path):
    run = fit_run(tmp_path / "runs", "x", "cfg")
    (run / "config.yaml").write_text("a: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve(run)
    if os.geteuid() != 0:  # root reads any file
        (run / "config.yaml").chmod(0)
        with pytest.raises(ConfigError, match="cannot read"):
            resolve(run)


def test_paths_a_run_stores_relative_to_its_job_folder_are_found_from_elsewhere(tmp_path, monkeypatch):
    """A stage run's config names the stitching run relative to the folder the job ran in; loading
    the run from another folder finds it there (and leaves paths that exist from here alone)."""
    from icp.core import config as cfglib
    from icp.core.runs import anchor_stored_paths

    job = tmp_path / "proj"
    stitching = job / "runs/q/main/stages/stitching/cfg-1"
    stitching.mkdir(parents=True)
    run = job / "runs/q/main/stages/adaptation/cfg-2"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("experiment: adaptation\nrun: {root: runs/q/main/stages}\n"
                                     "model: {appearance_from: runs/q/main/stages/stitching/cfg-1, backbone: {path: gone}}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = cfglib.load(run / "config.yaml")
    anchor_stored_paths(run, cfg)
    assert cfg.model.appearance_from == str(stitching)
    assert cfg.model.backbone.path == "gone"  # not found from the job folder either: left as it was
    monkeypatch.chdir(job)
    cfg = cfglib.load("runs/q/main/stages/adaptation/cfg-2/config.yaml")
    anchor_stored_paths(Path("runs/q/main/stages/adaptation/cfg-2"), cfg)
    assert cfg.model.appearance_from == "runs/q/main/stages/stitching/cfg-1"  # exists from here: unchanged
