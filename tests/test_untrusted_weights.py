"""Weights from someone else cannot run code: checkpoints load with weights_only=True (our own
Lightning checkpoints do), a pickled one is refused in one line naming the file, the object and
the flag (``--trust-checkpoint`` / ``trust_checkpoint=True``) that says what it risks; exported
nets load from safetensors only."""

import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from icp.core import config as cfglib
from icp.cli import main
from icp.core.errors import WeightsError
from icp.tasks.loading import load_task, read_checkpoint
from icp.jobs.fit import fit

MARKER = "pwned.txt"


class Payload:
    """Unpickling this creates a file: the observable stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, repo_root_module):
    cwd = pathlib.Path.cwd()
    root = tmp_path_factory.mktemp("weights")
    import os

    os.chdir(root)
    try:
        run = fit(cfglib.load(repo_root_module / "tests/configs/toy.yaml", ["run.name=w", "trainer.max_steps=3"])).resolve()
    finally:
        os.chdir(cwd)
    return run


@pytest.fixture(scope="module")
def repo_root_module():
    return pathlib.Path(__file__).resolve().parents[1]


def poisoned_copy(run: pathlib.Path, dst: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A copy of ``run`` whose last.ckpt also carries a Payload; -> (run copy, marker path)."""
    (dst / "checkpoints").mkdir(parents=True)
    (dst / "config.yaml").write_text((run / "config.yaml").read_text())
    blob = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    marker = dst / MARKER
    blob["extra"] = Payload(marker)
    torch.save(blob, dst / "checkpoints" / "last.ckpt")
    return dst, marker


def test_own_lightning_checkpoints_load_weights_only(toy_run):
    for ckpt in sorted((toy_run / "checkpoints").glob("*.ckpt")):
        blob = read_checkpoint(ckpt)  # weights_only=True inside
        assert "state_dict" in blob and "optimizer_states" in blob and "loops" in blob
    task = load_task(toy_run)
    ref = torch.load(toy_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(task.state_dict()[k], v) for k, v in ref.items())


def test_pickled_checkpoint_is_refused_unless_trusted(toy_run, tmp_path):
    run, marker = poisoned_copy(toy_run, tmp_path / "foreign")
    with pytest.raises(WeightsError) as err:
        load_task(run)
    message = str(err.value)
    assert "last.ckpt" in message and "pickled Python objects (first: getattr)" in message and "--trust-checkpoint" in message
    assert "runs pickled code" in message and "\n" not in message
    assert not marker.exists()  # nothing ran
    task = load_task(run, trust_checkpoint=True)  # the explicit opt-in does what it says...
    assert marker.exists() and task is not None  # ...including running the file's code


def test_resume_never_unpickles_code(toy_run, tmp_path, repo_root_module, monkeypatch):
    """`icp fit` resumes through Lightning, which loads weights_only too: a poisoned last.ckpt fails."""
    monkeypatch.chdir(tmp_path)
    cfg = cfglib.load(repo_root_module / "tests/configs/toy.yaml", ["run.name=w", "trainer.max_steps=4"])
    target = tmp_path / "runs" / "toy" / "w"
    target.parent.mkdir(parents=True)
    poisoned_copy(toy_run, target)
    marker = target / MARKER
    with pytest.raises(Exception):
        fit(cfg)
    assert not marker.exists()


def test_generate_cli_refuses_a_pickled_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "experiment: a\nmodel:\n  _target_: icp.tasks.adaptation.AdaptationTask\n"
        "  backbone: {_target_: icp.models.backbone.tiny, resolution: 32, width: 16}\n")
    marker = tmp_path / MARKER
    torch.save({"state_dict": {}, "global_step": 1, "x": Payload(marker)}, run / "checkpoints" / "last.ckpt")
    img = tmp_path / "face.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    args = ["generate", "--profile", str(img), "--target", str(img), "--checkpoint", str(run),
            "--out", str(tmp_path / "o.png"), "--no-align", "--device", "cpu", "--steps", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("icp: error:") and "--trust-checkpoint" in err and not marker.exists()


def test_appearance_sources_are_safe(tmp_path):
    from icp.models.backbone import tiny
    from icp.tasks.adaptation import AdaptationTask, load_appearance
    from icp.tasks.stitching import StitchingTask

    torch.manual_seed(0)
    stitch = StitchingTask(tiny(resolution=32, width=16))
    task = AdaptationTask(tiny(resolution=32, width=16))
    marker = tmp_path / MARKER
    ckpt = tmp_path / "stitch.ckpt"
    torch.save({"state_dict": stitch.state_dict(), "global_step": 1, "x": Payload(marker)}, ckpt)
    with pytest.raises(WeightsError, match="trust-checkpoint"):
        load_appearance(task, ckpt)
    assert not marker.exists()
    # An exported Appearance Net holding only a pickled .bin is refused (safetensors only).
    export = tmp_path / "export"
    stitch.appearance.to_controlnet().save_pretrained(export, safe_serialization=False)
    assert list(export.glob("*.bin")) and not list(export.glob("*.safetensors"))
    with pytest.raises(WeightsError, match="cannot load the exported Appearance Net"):
        load_appearance(task, export)
    stitch.appearance.to_controlnet().save_pretrained(export)  # safetensors: accepted
    load_appearance(task, export)
    ref = stitch.appearance.state_dict()
    assert all(torch.equal(task.appearance.state_dict()[k], v) for k, v in ref.items())


def test_config_cannot_reach_code_running_targets(tmp_path):
    from icp.core.errors import ConfigError

    cases = {
        "self_widened": "security: {allowed_targets: [os]}\nx: {_target_: os.system, command: 'true'}\n",
        "pickle_load": "x: {_target_: torch.load, f: a.ckpt, weights_only: false}\n",
    }
    refused = 0
    for name, text in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        try:
            cfg = cfglib.load(path)
            cfglib.validate(cfg.x, cfg, "x")
        except ConfigError:
            refused += 1
    assert refused == len(cases)


def test_photo_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    from icp.core.errors import DataError
    from icp.inference import read_image

    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2x the cap: PIL raises its bomb error
    with pytest.raises(DataError, match="DecompressionBombError"):
        read_image(tmp_path / "big.png")
