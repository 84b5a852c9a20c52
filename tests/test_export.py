"""`icp export RUN OUT` and icp.ICPortraitPipeline: the exported folder is the whole method, and
gives `icp generate`'s image for the same seed (issue 28)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from icp import cli
from tests.adaptation_run import make_job


@pytest.fixture(scope="module")
def job(tmp_path_factory, one_thread):
    return make_job(tmp_path_factory.mktemp("job"))


@pytest.fixture(scope="module")
def exported(job):
    out = job["root"] / "export"
    assert cli.main(["export", str(job["main"]), str(out)]) == 0  # the main job's root, as the README says
    return out


def test_folder_is_a_diffusers_pipeline_with_every_part(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "ICPortraitPipeline"
    parts = {"unet", "appearance", "matching", "fusion", "codec", "text_encoder", "tokenizer", "scheduler"}
    assert parts <= set(index) and all((exported / p).is_dir() for p in parts)
    assert index["appearance"] == ["diffusers", "ControlNetModel"] and index["fusion"] == ["icp.pipeline", "FusionModel"]
    assert index["resolution"] == 32 and index["mask_ratio"] == 0.8 and index["patch_size"] == 8
    assert index["training_domain"] == "synthetic renders at 32 px"
    assert index["adaptation"]["guidance_scale"] == 1.5
    assert not list(exported.rglob("*.bin")) and list(exported.rglob("*.safetensors"))  # no pickles


def test_every_trained_weight_is_exported(job, exported):
    """The pipeline rebuilt from the folder holds the run's weights (the EMA's), part by part: a part
    left out of the export (the fusion, the Matching Net) or not loaded back fails here."""
    from icp import ICPortraitPipeline

    pipe = ICPortraitPipeline.from_pretrained(str(exported))
    rebuilt = pipe._task().state_dict()
    source = job["task"].state_dict()
    assert set(rebuilt) == set(source)
    for prefix in ("fusion.", "matching.", "appearance.", "backbone.unet."):
        keys = [k for k in source if k.startswith(prefix)]
        assert keys and all(torch.equal(rebuilt[k], source[k]) for k in keys), prefix


def test_exported_pipeline_gives_generates_image(job, exported, tmp_path):
    from icp import ICPortraitPipeline

    out = tmp_path / "gen.png"
    args = ["--profile", str(job["profile"]), "--target", str(job["target"]), "--steps", "3", "--seed", "7"]
    assert cli.main(["generate", *args, "--checkpoint", str(job["main"]), "--device", "cpu", "--out", str(out)]) == 0
    pipe = ICPortraitPipeline.from_pretrained(str(exported))
    image = pipe([job["profile"]], job["target"], num_inference_steps=3, seed=7).images[0]
    ours, theirs = np.asarray(image, dtype=np.int16), np.asarray(Image.open(out), dtype=np.int16)
    assert ours.shape == theirs.shape == (32, 32, 3) and theirs.std() > 0
    assert np.abs(ours - theirs).max() <= 1
    other = pipe([job["target"]], job["target"], num_inference_steps=3, seed=7).images[0]
    assert np.abs(np.asarray(other, dtype=np.int16) - theirs).max() > 8  # the profile matters


def test_plain_diffusers_loads_it_through_the_shim(exported, monkeypatch, tmp_path):
    from diffusers import DiffusionPipeline
    from diffusers.utils import dynamic_modules_utils

    from icp.pipeline import ICPortraitPipeline

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    pipe = DiffusionPipeline.from_pretrained(str(exported), custom_pipeline="icp_pipeline", trust_remote_code=True)
    assert isinstance(pipe, ICPortraitPipeline) and pipe.config.resolution == 32


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_half_written(job, tmp_path, capsys, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert cli.main(["export", str(job["main"]), str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err and (taken / "keep.txt").read_text() == "mine"
    assert cli.main(["export", str(job["main"]), str(taken / "keep.txt")]) == 2
    assert "is a file" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "mine"

    from icp.pipeline import ICPortraitPipeline

    def broken(self, folder, **kwargs):
        (folder / "unet").mkdir(parents=True)
        raise OSError(28, "No space left on device", str(folder))

    monkeypatch.setattr(ICPortraitPipeline, "save_pretrained", broken)
    assert cli.main(["export", str(job["main"]), str(tmp_path / "new")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no OUT, no temporary folder


def test_import_icp_stays_light():
    code = "import sys, icp; heavy = [m for m in ('torch', 'diffusers') if m in sys.modules]; assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True)
    import icp
    from icp.pipeline import ICPortraitPipeline

    assert icp.ICPortraitPipeline is ICPortraitPipeline
    with pytest.raises(AttributeError):
        icp.NoSuchThing
