"""Shared helpers of the perf tests (tests/test_perf_*.py, tests/test_bench.py): tiny tasks, a fixed
batch, losses and samples on fixed noise, the sampling loop as it was before model.perf."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from icp import perf
from icp.data import keys as K
from icp.models.backbone import tiny

RES = 32


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    perf.set_sdpa_backend("auto")
    torch.set_num_threads(before)


def _unet_loss(unet, seed=0, memory_format=torch.contiguous_format, autocast=True, return_pred=False):
    gen = torch.Generator().manual_seed(seed)
    c = unet.config.in_channels
    x = torch.randn(2, c, 8, 8, generator=gen).contiguous(memory_format=memory_format)
    noise = torch.randn(2, c, 8, 8, generator=gen)
    text = torch.randn(2, 16, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([10, 500])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        pred = unet(x, t, encoder_hidden_states=text).sample
    return pred.float() if return_pred else F.mse_loss(pred.float(), noise)


def _norm_rel(a, b):
    return float((a - b).norm() / b.norm())


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _batch(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(n, 3, RES, RES, generator=gen) * 2 - 1
    keep = (torch.rand(n, 1, RES, RES, generator=gen) > 0.8).float()
    return {K.PROFILE: torch.rand(n, 3, RES, RES, generator=gen) * 2 - 1, K.TARGET: target,
            K.TARGET_MASKED: target * keep, K.TARGET_KEEP: keep}


def _stitching(perf_node=None, **kwargs):
    from icp.tasks.stitching import StitchingTask

    torch.manual_seed(0)
    task = StitchingTask(tiny(resolution=RES, width=32, seed=5), cond_drop_prob=0.0, perf=perf_node, **kwargs)
    with torch.no_grad():  # zero-initialised projections would make every residual zero
        for p in [*task.appearance.proj_down.parameters(), *task.appearance.proj_mid.parameters()]:
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return task


def _loss_and_grads(task, seed=0):
    """Loss on a fixed batch, noise and timesteps under bf16 autocast, and the trained weights' gradient."""
    task.train()
    task.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.losses(_batch(seed=seed), generator=torch.Generator().manual_seed(7 + seed))["loss"]
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in task.trainable_parameters()])
    return float(loss.detach()), grads


def _old_sample(task, batch, num_steps, guidance, generator):
    """DiffusionTask.sample as it was before model.perf (two UNet calls, no graphs, no autocast)."""
    b, _, h, w = batch[K.PROFILE].shape
    f = task.backbone.downscale
    task.eval()
    with torch.no_grad():
        latents = torch.randn((b, task.backbone.latent_channels, h // f, w // f), generator=generator)
        scheduler = task.backbone.sampling_scheduler(task.sampler)
        scheduler.set_timesteps(num_steps)
        latents = latents * scheduler.init_noise_sigma
        state = task.prepare_condition(batch)
        text = task.text_states(batch, b)
        uncond = task.empty_text_states(b)
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            tb = t.expand(b)
            pred = task.unet(x, tb, text, task.condition(state, x, tb, text)).float()
            pred_u = task.unet(x, tb, uncond).float()
            pred = pred_u + guidance * (pred - pred_u)
            latents = scheduler.step(pred, t, latents).prev_sample
        return task.backbone.codec.decode(latents).float().clamp(-1, 1)


def _sample(task, batch, steps=3, guidance=3.0):
    return task.sample(batch, num_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(3))


class _Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {k: v[0] for k, v in _batch(1, seed=i).items()}


def _traced_loss_and_grads(task, part):
    """fp32 loss on a fixed batch, noise and timesteps, and ``part``'s gradients (compile-trace tests)."""
    task.zero_grad(set_to_none=True)
    loss = task.losses(_batch(), generator=torch.Generator().manual_seed(1))["loss"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in part.parameters() if p.grad is not None]


def _vae_attention(width=320):
    """An SD-VAE mid-block attention block (one head as wide as the channels)."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=width, heads=1, dim_head=width, norm_num_groups=32, residual_connection=True,
                     bias=True, upcast_softmax=True, _from_deprecated_attn_block=True, eps=1e-6,
                     rescale_output_factor=1.0).eval()
