"""Backbone builders, codecs, and the local-folder loading path real weights use."""

import json

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel
from transformers.models.clip.tokenization_clip import CLIPTokenizer

from icp.core.errors import WeightsError
from icp.models import backbone as B
from icp.models.codec import PixelCodec


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return B.tiny(resolution=32, width=16)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_backbone")
    tiny.save_pretrained(folder)
    return folder


def _outputs(backbone, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    latents = backbone.codec.encode(images)
    text = backbone.encode_text(["a photo of a person", "portrait lit from the left"])
    with torch.no_grad():
        pred = backbone.unet(latents, torch.tensor([10, 900]), encoder_hidden_states=text).sample
    return latents, text, pred


def test_pixel_codec_is_lossless_and_shaped():
    codec = PixelCodec(factor=4)
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    latents = codec.encode(images)
    assert latents.shape == (2, 48, 8, 12) and codec.latent_channels == 48 and codec.downscale == 4
    assert torch.equal(codec.decode(latents), images)


def test_tiny_backbone_shapes(tiny):
    latents, text, pred = _outputs(tiny)
    assert latents.shape == (2, tiny.latent_channels, 8, 8)
    assert text.shape == (2, tiny.tokenizer.model_max_length, tiny.text_encoder.config.hidden_size)
    assert pred.shape == latents.shape and torch.isfinite(pred).all()
    # different prompts give different text states (the tokenizer is not degenerate)
    assert not torch.allclose(text[0], text[1])


def test_saved_backbone_loads_back_identically(tiny, saved):
    loaded = B.pretrained(str(saved))
    for a, b in zip(_outputs(tiny), _outputs(loaded)):
        assert torch.equal(a, b)
    assert loaded.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert (saved / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_saved_parts_load_without_icp(saved):
    # The folder is plain diffusers/transformers format: each library reads its part on its own.
    UNet2DConditionModel.from_pretrained(saved / "unet", local_files_only=True)
    CLIPTextModel.from_pretrained(saved / "text_encoder", local_files_only=True)
    tok = CLIPTokenizer.from_pretrained(saved / "tokenizer", local_files_only=True)
    assert tok("a photo").input_ids[0] == tok.bos_token_id
    DDPMScheduler.from_pretrained(saved / "scheduler")
    assert json.loads((saved / "codec" / "codec_config.json").read_text())["factor"] == 4


def test_vae_backbone_is_a_stable_diffusion_pipeline_folder(tmp_path):
    backbone = B.tiny(resolution=32, width=16, codec="vae", codec_factor=4)
    assert backbone.latent_channels == 4 and backbone.downscale == 4
    backbone.save_pretrained(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True, safety_checker=None)
    assert pipe.vae.config.latent_channels == 4
    loaded = B.pretrained(str(tmp_path))
    for a, b in zip(_outputs(backbone), _outputs(loaded)):
        assert torch.equal(a, b)


def _one_line(err):
    return "\n" not in str(err.value) and len(str(err.value)) < 400


def test_missing_folder_raises_weights_error(tmp_path):
    with pytest.raises(WeightsError) as err:
        B.pretrained(str(tmp_path / "nope"))
    assert "nope" in str(err.value) and _one_line(err)


def test_missing_subfolder_raises_weights_error(saved, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    shutil.rmtree(copy / "text_encoder")
    with pytest.raises(WeightsError) as err:
        B.pretrained(str(copy))
    assert "text_encoder" in str(err.value) and _one_line(err)


@pytest.mark.parametrize("garble", ["truncate_weights", "bad_config"])
def test_garbled_folder_raises_weights_error(saved, tmp_path, garble):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    if garble == "truncate_weights":
        weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (copy / "unet" / "config.json").write_text("{not json")
    with pytest.raises(WeightsError) as err:
        B.pretrained(str(copy))
    assert "unet" in str(err.value) and _one_line(err)


def test_sd15_random_requires_no_path():
    from icp.core.errors import ConfigError

    with pytest.raises(ConfigError):
        B.sd15(path="some/folder", random=True)
    with pytest.raises(WeightsError):
        B.sd15(path=None, random=False)
