"""Lighting-Aware Stitching (paper §3.2): train the Appearance Net on [profile | masked target].

The profile ``I_p`` and the heavily masked target ``I'_l`` are encoded and stitched side by side
on one canvas. The Appearance Net (a :class:`ControlUNet` copied from the base UNet) reads

- as its sample: [profile latent | noisy target latent] -- so the target half knows where in the
  denoising trajectory it is, and self-attention over the whole canvas lets it draw identity
  from the profile half;
- as its condition: [profile latent | masked target latent] -- the sparse surviving pixels carry
  the target's lighting (not enough of it to leak identity at ~80% masking).

Its target-half features D_t are injected into the generation UNet ControlNet-style; the loss
is the usual denoising loss on the target latent (base class).
"""

from __future__ import annotations

from typing import Any

import torch

from icp.data import keys as K
from icp.models.backbone import Backbone
from icp.models.control import ControlUNet, split_halves, stitch
from icp.tasks.base import DiffusionTask, Residuals


class StitchingTask(DiffusionTask):
    """Stage 1 of IC-Portrait. Extra kwarg: ``cond_embedding_channels`` (the Appearance Net's
    condition stem width); everything else is :class:`DiffusionTask`'s."""

    def __init__(self, backbone: Backbone, cond_embedding_channels: int = 64, **kwargs: Any):
        super().__init__(backbone=backbone, **kwargs)
        self.appearance = ControlUNet(backbone.unet, cond_embedding_channels=cond_embedding_channels)

    def prepare_condition(self, batch: dict) -> dict[str, torch.Tensor]:
        profile = self.encode_images(batch[K.PROFILE])
        masked = self.encode_images(batch[K.TARGET_MASKED])
        return {"profile": profile, "cond": stitch(profile, masked)}

    def appearance_features(self, state: dict, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                            text_states: torch.Tensor) -> list[torch.Tensor]:
        """RAW per-level canvas features, each (B, C_l, h_l, 2*w_l) (see icp.models.control)."""
        canvas = stitch(state["profile"].to(noisy_latents.dtype), noisy_latents)
        return self.appearance(canvas, timesteps, text_states, state["cond"].to(noisy_latents.dtype))

    def condition(self, state: dict, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                  text_states: torch.Tensor) -> Residuals:
        _, target_feats = split_halves(self.appearance_features(state, noisy_latents, timesteps, text_states))
        return self.appearance.residuals(target_feats)
