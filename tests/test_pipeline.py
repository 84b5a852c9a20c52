"""End-to-end inference on a tiny saved adaptation run (random weights: plumbing, not quality)."""

import numpy as np
import pytest
import torch
from PIL import Image

from icp import cli
from icp.core.errors import DataError
from icp.inference import PortraitPipeline, parse_light_spec, synthetic_lighting, transfer_lighting
from icp.tasks.adaptation import AdaptationTask

RUN_CONFIG = """\
experiment: adaptation-test
data:
  resolution: 32
  mask_ratio: 0.8
  patch_size: 8
model:
  _target_: icp.tasks.adaptation.AdaptationTask
  guidance_scale: 1.5
  backbone:
    _target_: icp.models.backbone.tiny
    resolution: 32
    width: 16
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as `icp fit` leaves it: config.yaml + checkpoints/last.ckpt (trained weights only)."""
    from icp.core import config as cfglib

    root = tmp_path_factory.mktemp("run")
    (root / "config.yaml").write_text(RUN_CONFIG)
    cfg = cfglib.load(root / "config.yaml")
    task = cfglib.instantiate(cfg.model, cfg, "model")
    assert isinstance(task, AdaptationTask)
    with torch.no_grad():  # open the injection so the profile actually changes the output
        for proj in task.fusion.proj:
            proj.weight.normal_(std=0.5)
    checkpoint = {"state_dict": task.state_dict(), "global_step": 1}  # as Lightning writes it
    task.on_save_checkpoint(checkpoint)  # drops frozen backbone weights, as real checkpoints do
    (root / "checkpoints").mkdir()
    torch.save(checkpoint, root / "checkpoints" / "last.ckpt")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    face = np.asarray(Image.fromarray(data.astronaut()).resize((256, 256)))  # smaller: faster MTCNN
    Image.fromarray(face).save(root / "profile.png")
    Image.fromarray(np.ascontiguousarray(face[:, ::-1])).save(root / "target.png")  # same face, other view
    Image.fromarray(data.coffee()).save(root / "coffee.png")
    light = (face.astype(np.float32) * np.linspace(0.3, 1.2, face.shape[1])[None, :, None]).clip(0, 255)
    Image.fromarray(light.astype(np.uint8)).save(root / "light.png")
    return root


def test_generate_cli_end_to_end(run_dir, photos, tmp_path):
    out = tmp_path / "out.png"
    rc = cli.main(["generate", "--profile", str(photos / "profile.png"), "--profile", str(photos / "target.png"),
                   "--target", str(photos / "target.png"), "--checkpoint", str(run_dir), "--steps", "2",
                   "--seed", "3", "--light", "dir=-1,0.2,1;color=1,0.9,0.8", "--prompt", "a portrait",
                   "--device", "cpu", "--out", str(out)])
    assert rc == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (32, 32, 3) and img.std() > 0


def test_no_face_is_a_one_line_data_error(run_dir, photos, tmp_path, capsys):
    rc = cli.main(["generate", "--profile", str(photos / "coffee.png"), "--target", str(photos / "target.png"),
                   "--checkpoint", str(run_dir), "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "o.png")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "no face found in" in err and "coffee.png" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.png").exists()
    rc = cli.main(["generate", "--profile", str(photos / "profile.png"), "--target", str(photos / "target.png"),
                   "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o.png")])
    assert rc == 2 and "no such run directory" in capsys.readouterr().err


def test_pipeline_is_seeded_and_uses_the_profile(run_dir, photos):
    # align=False: detection is covered by the CLI tests; here the crops are centre crops
    pipe = PortraitPipeline.from_checkpoint(run_dir, device="cpu", align=False)
    assert pipe.resolution == 32 and pipe.mask_ratio == 0.8
    assert pipe.task.perf_applied["inference"]  # prepared for sampling (bf16/compile only on CUDA)
    batch = pipe.prepare([photos / "profile.png"], photos / "target.png", seed=1)
    kept = batch["target_keep"].mean().item()
    assert kept == 3 / 16  # the training masking ratio: round(0.8 * 16) of 16 patches dropped
    a = pipe([photos / "profile.png"], photos / "target.png", steps=2, seed=1)
    b = pipe([photos / "profile.png"], photos / "target.png", steps=2, seed=1)
    c = pipe([photos / "light.png"], photos / "target.png", steps=2, seed=1)  # another profile photo
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_relighting_helpers():
    target = torch.zeros(3, 32, 32)
    left = synthetic_lighting(target, "dir=-1,0,0.3")
    assert left[:, 16, 8].mean() > left[:, 16, 24].mean()  # light from the left brightens the left cheek
    assert parse_light_spec("ambient=0.5")["ambient"] == 0.5
    with pytest.raises(DataError, match="light spec"):
        parse_light_spec("dir=1,2")
    dark = torch.full((3, 32, 32), -0.6)
    relit = transfer_lighting(torch.zeros(3, 32, 32), dark)
    assert relit.mean() < -0.3  # takes on the light portrait's (darker) level


def test_pipeline_loads_without_compiling_evaluation_with(run_dir, monkeypatch):
    """A few portraits do not repay ~2 minutes of torch.compile; a protocol's evaluation does."""
    from icp import perf
    from icp.tasks import loading

    seen = []
    real = perf.configure_inference
    monkeypatch.setattr(perf, "configure_inference", lambda *a, **k: seen.append(k["compile"]) or real(*a, **k))
    PortraitPipeline.from_checkpoint(run_dir, device="cpu", align=False)
    loading.load_task(run_dir)
    assert seen == [False, True]
