"""The denoising target follows the scheduler's prediction type (the tiny default predicts x0)."""

import pytest
import torch

from icp.data import keys as K
from icp.core.errors import ConfigError
from icp.models import backbone as B
from icp.tasks.stitching import StitchingTask

RES = 32


def batch():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, RES, RES, generator=g) * 2 - 1
    return {K.PROFILE: torch.rand(2, 3, RES, RES, generator=g) * 2 - 1, K.TARGET: target,
            K.TARGET_MASKED: target * 0, K.TARGET_KEEP: torch.zeros(2, 1, RES, RES)}


@pytest.mark.parametrize("kind", ["sample", "epsilon"])
def test_a_unet_predicting_the_right_target_has_zero_loss(kind, monkeypatch):
    torch.manual_seed(0)
    task = StitchingTask(B.tiny(resolution=RES, width=16, prediction_type=kind))
    b = batch()
    clean = task.encode_images(b[K.TARGET])
    captured = {}

    def add_noise(latents, noise, timesteps):
        captured["noise"] = noise
        return latents + noise

    monkeypatch.setattr(task.backbone.noise_scheduler, "add_noise", add_noise)
    monkeypatch.setattr(task, "unet", lambda x, *a, **k: clean if kind == "sample" else captured["noise"])
    assert float(task.losses(b)["loss"]) == 0.0


def test_unknown_prediction_type_is_a_config_error():
    with pytest.raises(ConfigError, match="prediction_type"):
        B.tiny(resolution=RES, width=16, prediction_type="x0")
