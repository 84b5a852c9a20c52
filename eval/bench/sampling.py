"""(d) icp sampling: ``task.sample`` as it is, and the same loop with the guided noise
prediction (control net + cond UNet + uncond UNet) captured once in a CUDA graph.

``graphed_sample`` mirrors DiffusionTask.sample line by line; the only change is that the
per-step model calls go through :func:`icp.perf.graphed`. It is the proposal for the task.
"""

from __future__ import annotations

import torch

from icp import perf
from icp.data import keys as K


def guided_eps(task, state, text, uncond, guidance: float):
    """(x, t) -> CFG noise prediction, exactly as DiffusionTask.sample computes it."""

    def eps(x: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        pred = task.unet(x, tb, text, task.condition(state, x, tb, text)).float()
        if uncond is not None:
            pred_u = task.unet(x, tb, uncond).float()
            pred = pred_u + guidance * (pred - pred_u)
        return pred

    return eps


@torch.no_grad()
def graphed_sample(task, batch: dict, num_steps: int, guidance_scale: float, generator=None,
                   autocast: bool = True) -> torch.Tensor:
    ref = batch[K.PROFILE]
    b, _, h, w = ref.shape
    f = task.backbone.downscale
    shape = (b, task.backbone.latent_channels, h // f, w // f)
    task.eval()
    device = task.device
    # cache off: cached weight casts made outside the capture must not be freed under the graph
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False)
    with ctx:
        latents = torch.randn(shape, generator=generator, device=device)
        scheduler = task.backbone.sampling_scheduler(task.sampler)
        scheduler.set_timesteps(num_steps, device=device)
        latents = latents * scheduler.init_noise_sigma
        state = task.prepare_condition(batch)
        text = task.text_states(batch, b)
        uncond = task.empty_text_states(b) if guidance_scale != 1.0 else None
        fn = guided_eps(task, state, text, uncond, guidance_scale)
        t0 = scheduler.timesteps[0]
        step = perf.graphed(fn, scheduler.scale_model_input(latents, t0), t0.expand(b).to(device))
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            pred = step(x, t.expand(b).to(device))
            latents = scheduler.step(pred, t, latents).prev_sample
        images = task.backbone.codec.decode(latents)
    return images.float().clamp(-1, 1)
