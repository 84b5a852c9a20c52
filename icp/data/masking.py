"""Random patch masking of the target portrait (paper §3.1, Lighting-Aware Stitching).

The target ``I_l`` is masked heavily (ratio ~0.8) so that the surviving sparse patches carry its
lighting and colour but too little of its identity to leak into the output. Pure functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from icp.core.errors import ConfigError


def num_dropped(height: int, width: int, ratio: float, patch_size: int) -> tuple[int, int]:
    """(patches dropped, patches in total) for one image; the patch grid covers H x W (ceil)."""
    total = math.ceil(height / patch_size) * math.ceil(width / patch_size)
    return int(round(ratio * total)), total


def random_patch_mask(
    shape: tuple[int, ...] | torch.Size | Tensor,
    ratio: float = 0.8,
    patch_size: int = 8,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """A (B, 1, H, W) float keep-mask (1 = pixel survives) with exactly round(ratio * patches) dropped.

    ``shape`` is (B, H, W), (B, C, H, W) or an image batch to take it from. Every image drops the
    same number of patches (an exact ratio, not a Bernoulli draw) so that the masking ratio in an
    ablation (paper's claim on ~80%) is what the config says, batch after batch. Patches at the
    right/bottom border are cut off when H or W is not a multiple of ``patch_size``.
    """
    if isinstance(shape, Tensor):
        device = shape.device if device is None else device
        shape = tuple(shape.shape)
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4):
        raise ConfigError(f"random_patch_mask: shape must be (B, H, W) or (B, C, H, W), got {shape}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ConfigError(f"mask_ratio={ratio} is outside [0, 1]; set data.mask_ratio to e.g. 0.8")
    if int(patch_size) < 1:
        raise ConfigError(f"patch_size={patch_size} must be a positive number of pixels (e.g. 8)")
    batch, height, width = shape[0], shape[-2], shape[-1]
    dropped, total = num_dropped(height, width, ratio, patch_size)
    gh, gw = math.ceil(height / patch_size), math.ceil(width / patch_size)
    # Rank patches by a uniform draw and drop the lowest `dropped`: an exact-count random subset.
    # Drawn on CPU so a seeded generator gives the same mask on any device.
    scores = torch.rand(batch, total, generator=generator)
    order = scores.argsort(dim=1)
    keep = torch.ones(batch, total)
    keep.scatter_(1, order[:, :dropped], 0.0)
    keep = keep.view(batch, 1, gh, gw)
    keep = keep.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return keep[:, :, :height, :width].contiguous().to(device or "cpu")


def apply_mask(image: Tensor, keep: Tensor) -> Tensor:
    """Zero the masked pixels (the batch contract's TARGET_MASKED: masked pixels = 0)."""
    if keep.shape[-2:] != image.shape[-2:]:
        raise ConfigError(f"apply_mask: mask {tuple(keep.shape)} does not match image {tuple(image.shape)}")
    return image * keep.to(image.dtype)


HEAD_FILL = 0.0  # mid-grey in [-1, 1]: what the background becomes when identity is scored on the head only


def head_only(images: Tensor, fg: Tensor, fill: float | Tensor = HEAD_FILL) -> Tensor:
    """The head alone: ``images`` (B,3,H,W) in [-1,1] with every pixel outside ``fg`` (B,1,H,W), the
    head mask, replaced by ``fill`` (a constant, or a tensor broadcastable to the images). Identity is
    scored on this (docs/decisions/eval.md), so the background cannot carry identity."""
    if fg.shape[-2:] != images.shape[-2:] or fg.shape[0] != images.shape[0]:
        raise ConfigError(f"head_only: mask {tuple(fg.shape)} does not match images {tuple(images.shape)}")
    fg = (fg.to(images.device, images.dtype) > 0.5).to(images.dtype)
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    return images * fg + fill * (1 - fg)
