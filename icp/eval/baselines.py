"""The baselines every figure is read against (DESIGN §6: the cheapest thing that also does X).

A baseline is a function ``(batch, generate) -> images | None``: ``generate(batch)`` runs the
method's own sampler with the method's noise, so a *model* baseline (another identity's profile)
differs from the method in exactly one input; a *model-free* baseline ignores ``generate``.
``None`` means the baseline does not exist for this batch (e.g. every pair is one identity).
Each is scored exactly like the method: against the TRUE profile and the true target.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from icp.data import keys as K

Generate = Callable[[dict], Tensor]
Baseline = Callable[[dict, Generate], "Tensor | None"]


def other_profiles(batch: dict) -> dict | None:
    """The batch with each profile replaced by the next pair's profile *of another identity*.

    Consecutive pairs may share an identity (several pairs per head); a plain roll would then hand
    many pairs a different view of the same person, which is no baseline at all.
    """
    ids = batch[K.IDENTITY].tolist()
    n = len(ids)
    if len(set(ids)) < 2:
        return None
    source = []
    for i in range(n):
        j = (i + 1) % n
        while ids[j] == ids[i]:
            j = (j + 1) % n
        source.append(j)
    swapped = dict(batch)
    swapped[K.PROFILE] = batch[K.PROFILE][source]
    swapped["baseline_profile_identity"] = batch[K.IDENTITY][source]
    return swapped


def other_identity(batch: dict, generate: Generate) -> Tensor | None:
    """The method with another identity's profile: what the output owes to the masked target alone."""
    swapped = other_profiles(batch)
    return None if swapped is None else generate(swapped)


def copy_profile(batch: dict, generate: Generate) -> Tensor:
    """The profile photo itself: perfect identity, the profile's pose, light and background."""
    return batch[K.PROFILE]


def mirror_profile(batch: dict, generate: Generate) -> Tensor:
    """The profile mirrored left-right: a pose change for free."""
    return batch[K.PROFILE].flip(-1)


def inpaint(batch: dict, generate: Generate) -> Tensor:
    """Model-free inpainting of the masked target (no profile at all): the visible pixels, and the
    hidden ones filled by normalised convolution at growing scales (each hole takes the mean colour
    of the nearest visible pixels)."""
    return inpaint_visible(batch[K.TARGET_MASKED], batch[K.TARGET_KEEP])


def truth(batch: dict, generate: Generate) -> Tensor:
    """The true render of the profile identity in the target's pose and light: the ceiling."""
    return batch[K.TARGET]


def inpaint_visible(image: Tensor, keep: Tensor, iterations: int = 64) -> Tensor:
    """Fill the pixels where ``keep`` is 0 from those where it is 1 (normalised 3x3 box diffusion)."""
    keep = keep.float().expand(-1, 1, -1, -1)
    known, weight = image.float() * keep, keep.clone()
    filled, have = known.clone(), keep.clone()
    for _ in range(iterations):
        if bool((have > 0).all()):
            break
        s = F.avg_pool2d(filled * have, 3, 1, 1, count_include_pad=False)
        w = F.avg_pool2d(have, 3, 1, 1, count_include_pad=False)
        grow = (w > 0) & (have == 0)
        filled = torch.where(grow, s / w.clamp_min(1e-8), filled)
        have = torch.where(grow, torch.ones_like(have), have)
    out = torch.where(weight > 0, known, filled)
    return out.to(image.dtype)


BASELINES: dict[str, Baseline] = {
    "other_identity": other_identity,
    "copy_profile": copy_profile,
    "mirror_profile": mirror_profile,
    "inpaint": inpaint,
    "truth": truth,
}
LABELS = {
    "method": "generated",
    "other_identity": "output, other id's profile",
    "copy_profile": "copy of the profile",
    "mirror_profile": "mirrored profile",
    "inpaint": "model-free inpainting",
    "truth": "true render (ceiling)",
    "no_warp": "adaptation without warp",
    "zero_flow": "zero flow",
}


def resolve(names) -> dict[str, Baseline]:
    from icp.core.errors import ConfigError

    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    return {n: BASELINES[n] for n in names}
