"""Reference-feature fusion: warp identity into the target pose, add lighting, project to residuals.

Paper §3.3: per feature level l, the Appearance Net gives identity features ``id_l`` (profile
half ``D_s``) and lighting features ``light_l`` (target half ``D_t``); the Matching Net gives a
flow target -> profile. The identity features are warped into the target's pose, the lighting
features are added as a residual, and the result is concatenated with the identity features:

    F_ref_l = concat(warp(id_l, flow_l) + light_l, id_l)

``F_ref_l`` enters the generation UNet ControlNet-style (paper §3.4): a zero-initialised 1x1
convolution maps it to the channels of the UNet's l-th skip connection (or its mid block) and is
added there, so at initialisation the generation UNet is exactly the base model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from icp.models.matching import warp


def zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """1x1 convolution whose weight and bias start at zero (ControlNet's zero convolution)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def reference_features(identity: Tensor, lighting: Tensor, flow: Tensor | None) -> Tensor:
    """F_ref for one level: (B, 2C, H, W) from identity/lighting (B, C, H, W) and flow (B, 2, H, W).

    ``flow=None`` is the unwarped ablation (paper's comparison with plain concatenation).
    """
    if identity.shape != lighting.shape:
        raise ValueError(f"identity {tuple(identity.shape)} and lighting {tuple(lighting.shape)} features differ")
    aligned = identity if flow is None else warp(identity, flow)
    return torch.cat((aligned + lighting, identity), dim=1)


class ReferenceFusion(nn.Module):
    """Builds F_ref per level and projects it, through zero convs, to the UNet's residual channels.

    feature_channels[l] is the appearance feature width of level l; residual_channels[l] the
    width of the generation UNet's l-th skip connection (the last entry may be the mid block).
    ``warp_identity=False`` skips the warp (the unwarped-concatenation ablation).
    """

    compile_as = "whole"  # icp.perf.compile: warps, cats and 1x1 convs per level as one region

    def __init__(self, feature_channels: Sequence[int], residual_channels: Sequence[int] | None = None,
                 warp_identity: bool = True, scale: float = 1.0):
        super().__init__()
        residual_channels = list(residual_channels if residual_channels is not None else feature_channels)
        if len(residual_channels) != len(feature_channels):
            raise ValueError(f"{len(feature_channels)} feature levels but {len(residual_channels)} residual levels")
        self.warp_identity = warp_identity
        self.scale = scale
        self.proj = nn.ModuleList(zero_conv(2 * c, r) for c, r in zip(feature_channels, residual_channels))

    def forward(self, identity: Sequence[Tensor], lighting: Sequence[Tensor],
                flows: Sequence[Tensor | None] | None) -> list[Tensor]:
        """Residuals (one per level) to add to the generation UNet's skip connections."""
        n = len(self.proj)
        if len(identity) != n or len(lighting) != n or (flows is not None and len(flows) != n):
            raise ValueError(f"ReferenceFusion has {n} levels; got {len(identity)} identity, "
                             f"{len(lighting)} lighting, {len(flows) if flows is not None else 0} flow maps")
        out = []
        for l, proj in enumerate(self.proj):
            flow = flows[l] if (flows is not None and self.warp_identity) else None
            ref = reference_features(identity[l], lighting[l], flow)
            out.append(proj(ref.to(proj.weight.dtype)) * self.scale)
        return out
