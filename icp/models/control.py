"""Control UNets: ControlNet-style copies of the base UNet that read the stitched canvas.

Paper §3.2-3.3: the canvas [profile latent | masked target latent] (concatenated along width)
goes through a copy of the base UNet's encoder (diffusers ``ControlNetModel.from_unet``). Its
multi-level features are split back into a profile half ``D_s`` and a target half ``D_t``; the
Appearance Net's target half is injected into the generation UNet through zero-initialised
1x1 projections added to the skip connections (ControlNet's ``controlnet_down_blocks`` /
``controlnet_mid_block``), so at initialisation the injection is exactly a no-op.

Feature layout (the contract with matching.py / fusion.py / tasks):
``features`` is a list over levels, one entry per UNet skip connection plus the mid block last;
entry ``l`` has shape (B, C_l, h_l, 2 * w_l) -- the canvas width -- with the profile half in
columns ``[:w_l]`` and the target half in ``[w_l:]``. For SD1.5 that is 12 skip levels + mid =
13 entries, C_l in {320, 640, 1280}, h_l = H/8 / 2**k. Features are RAW: taken *before* the
zero projections, so they carry signal from step 0 (the matching needs that).
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

Features = list[torch.Tensor]


# ------------------------------------------------------------------ canvas maths (pure functions)


def stitch(profile: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[profile | target] side by side along width: (B, C, h, w) x2 -> (B, C, h, 2w) (paper §3.2)."""
    if profile.shape != target.shape:
        raise ValueError(f"stitch: profile {tuple(profile.shape)} and target {tuple(target.shape)} differ in shape")
    return torch.cat([profile, target], dim=-1)


def unstitch(canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`stitch`: (B, C, h, 2w) -> (profile, target), each (B, C, h, w)."""
    width = canvas.shape[-1]
    if width % 2:
        raise ValueError(f"unstitch: canvas width {width} is odd; the canvas must be two equal halves")
    return canvas[..., : width // 2], canvas[..., width // 2 :]


def split_halves(features: Features) -> tuple[Features, Features]:
    """Per-level features of the canvas -> (profile features D_s, target features D_t)."""
    halves = [unstitch(f) for f in features]
    return [p for p, _ in halves], [t for _, t in halves]


# --------------------------------------------------------------------------------- the module


def _base_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without LoRA adapters (peft renames wrapped layers to ``*.base_layer.*``)."""
    return {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}


def _copy_encoder(unet: UNet2DConditionModel, net: ControlNetModel) -> None:
    """Copy the UNet encoder into the ControlNet (as ``from_unet`` does), also for a LoRA-wrapped UNet."""
    for name in ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding",
                 "down_blocks", "mid_block"):
        src, dst = getattr(unet, name, None), getattr(net, name, None)
        if isinstance(src, nn.Module) and isinstance(dst, nn.Module):
            dst.load_state_dict(_base_state(src))


class ControlUNet(nn.Module):
    """A trainable copy of the base UNet's encoder that returns RAW multi-level canvas features.

    ``forward(sample, timesteps, text_states, cond) -> features`` (see the module docstring);
    ``residuals(features) -> (down_residuals, mid_residual)`` applies the zero-initialised
    projections, ready for ``unet(..., down_block_additional_residuals=...,
    mid_block_additional_residual=...)``. Features given to ``residuals`` must have the raw
    per-level channel counts (:attr:`channels`); any width may be used (target half: w_l).
    """

    compile_as = "blocks"  # icp.perf.compile: by block, or whole under compile_regional=false

    def __init__(self, unet: UNet2DConditionModel, conditioning_channels: int | None = None,
                 cond_embedding_channels: int = 64, copy_weights: bool = True):
        super().__init__()
        conditioning_channels = conditioning_channels or int(unet.config.in_channels)
        # A single-entry embedding tuple = conv_in + zero conv_out and *no* stride-2 convs: the
        # condition is already a latent, at the UNet's resolution, so it must not be downsampled.
        net = ControlNetModel.from_unet(
            unet, conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=(cond_embedding_channels,), load_weights_from_unet=False,
        )
        if copy_weights:
            _copy_encoder(unet, net)
        # Move ControlNet's zero convs out of the network so that its forward returns raw features
        # (Identity * conditioning_scale 1.0 is exact); they become our injection projections.
        self.proj_down = net.controlnet_down_blocks
        self.proj_mid = net.controlnet_mid_block
        net.controlnet_down_blocks = nn.ModuleList([nn.Identity() for _ in self.proj_down])
        net.controlnet_mid_block = nn.Identity()
        self.net = net

    @property
    def num_levels(self) -> int:
        return len(self.proj_down) + 1

    @property
    def channels(self) -> list[int]:
        """C_l per level (skip levels, then mid)."""
        return [m.in_channels for m in self.proj_down] + [self.proj_mid.in_channels]

    def enable_gradient_checkpointing(self) -> None:
        self.net.enable_gradient_checkpointing()

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor,
                cond: torch.Tensor) -> Features:
        """sample: (B, C, h, 2w) (noisy) canvas; cond: (B, C_cond, h, 2w) condition canvas."""
        down, mid = self.net(sample, timesteps, encoder_hidden_states=text_states, controlnet_cond=cond,
                             return_dict=False)
        return [*down, mid]

    def residuals(self, features: Features) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Zero-initialised 1x1 projections per level -> (down residuals, mid residual)."""
        if len(features) != self.num_levels:
            raise ValueError(f"residuals: got {len(features)} feature levels, expected {self.num_levels}")
        down = tuple(proj(f) for proj, f in zip(self.proj_down, features[:-1]))
        return down, self.proj_mid(features[-1])

    def to_controlnet(self) -> ControlNetModel:
        """A standard diffusers ``ControlNetModel`` with these weights (for export / other tools)."""
        net = ControlNetModel.from_config(self.net.config)
        state = {k: v for k, v in self.net.state_dict().items()
                 if not k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))}
        state.update({f"controlnet_down_blocks.{k}": v for k, v in self.proj_down.state_dict().items()})
        state.update({f"controlnet_mid_block.{k}": v for k, v in self.proj_mid.state_dict().items()})
        net.load_state_dict(state)
        return net if net.dtype == self.net.dtype else net.to(self.net.dtype)
