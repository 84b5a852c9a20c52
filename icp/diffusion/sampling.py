"""Sampling as pure functions: one signature for every sampler, guidance as a model wrapper.

Every sampler family the backbone offers (DDIM, DDPM, Euler: diffusers schedulers built by
``Backbone.sampling_scheduler``) runs through the one loop :func:`sample`:

    latents = sample(denoiser, initial_noise(shape, generator, device), scheduler, num_steps)

where ``denoiser(x, t) -> model output`` (what the scheduler's ``prediction_type`` names) is the
only thing a task supplies. Classifier-free guidance is a wrapper that turns a model giving both
branches into such a denoiser (:func:`classifier_free_guidance`; k-diffusion's ``CFGDenoiser``):
kept outside the loop so that a task can replay one whole guided step -- control nets, both
UNet branches and the guidance sum -- as a single CUDA graph.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Branches = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def classifier_free_guidance(branches: Branches, scale: float) -> Denoiser:
    """A denoiser from ``branches(x, t) -> (conditional, unconditional)`` model outputs."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = branches(x, t)
        return guide(cond, uncond, scale)

    return denoise


def initial_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Unit Gaussian latents, drawn on the generator's device (so a seed gives the same noise
    whatever device the model is on) and moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


@torch.no_grad()
def sample(denoiser: Denoiser, noise: torch.Tensor, scheduler: Any, num_steps: int,
           model_device: torch.device | str | None = None) -> torch.Tensor:
    """Run ``scheduler`` (a fresh diffusers scheduler of any family) for ``num_steps`` from unit
    ``noise``; returns the final latents.

    The scheduler steps on host timesteps while the denoiser gets a copy on ``model_device``
    (default: the noise's), moved once: with device timesteps DDIM's step reads each one back
    (``alphas_cumprod[t]``, ``prev_t >= 0``), a host sync per step that idles the GPU.
    Stochastic schedulers (DDPM) draw their step noise from the global generator.
    """
    scheduler.set_timesteps(num_steps, device="cpu")
    model_timesteps = scheduler.timesteps.to(noise.device if model_device is None else model_device)
    latents = noise * scheduler.init_noise_sigma
    b = noise.shape[0]
    for t, model_t in zip(scheduler.timesteps, model_timesteps):
        x = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(denoiser(x, model_t.expand(b)), t, latents).prev_sample
    return latents
