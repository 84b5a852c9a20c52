"""The denoising loss as pure functions of a latent batch and a diffusers noise scheduler.

Training noises the clean latent ``x0`` at uniformly drawn timesteps (DDPM, Ho et al. 2020),
the model predicts what the scheduler's ``prediction_type`` names, and the loss is the MSE
against that target (the paper trains with SD's objective, §3.2-3.3):

- ``epsilon``: the noise;
- ``v_prediction``: ``v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0`` (Salimans & Ho 2022);
- ``sample``: ``x0`` itself.

Random draws happen in a fixed order (noise, then timesteps) so that a seeded generator gives the
same batch as before these functions were split out of the task.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Noised(NamedTuple):
    noisy: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def sample_timesteps(n: int, scheduler: Any, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` training timesteps drawn uniformly from ``[0, num_train_timesteps)`` (int64)."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator, device=device).long()


def noise_latents(latents: torch.Tensor, scheduler: Any, generator: torch.Generator | None = None,
                  timesteps: torch.Tensor | None = None) -> Noised:
    """Gaussian noise at ``timesteps`` (drawn per sample when None) added by the scheduler."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if timesteps is None:
        timesteps = sample_timesteps(latents.shape[0], scheduler, generator, latents.device)
    return Noised(scheduler.add_noise(latents, noise, timesteps), noise, timesteps)


def prediction_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the model should output for ``scheduler.config.prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type '{kind}' (one of {', '.join(PREDICTION_TYPES)})")


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 (predictions under bf16 autocast are upcast first); every
    timestep weighs the same, as in SD's training."""
    return F.mse_loss(pred.float(), target.float())
