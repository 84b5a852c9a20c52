"""(a) The plain diffusers baseline: a train step and a sampling loop written as diffusers'
own example scripts write them (train_text_to_image.py, StableDiffusion[ControlNet]Pipeline),
with no icp code in the timed path. fp32 trained weights + bf16 autocast + fused AdamW + SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from icp.models.backbone import SD15_SCHEDULER


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def mark_step(on: bool) -> None:
    """A new step for inductor's CUDA graphs (compile mode reduce-overhead): what their error
    ("accessing tensor output of CUDAGraphs that has been overwritten") tells a user to call
    before each model invocation, so outputs kept from the last step may be overwritten."""
    if on:
        torch.compiler.cudagraph_mark_step_begin()


class PlainTrainStep:
    """One diffusers-style training step of the full UNet on given latents (callable).
    ``mark_steps``: mark each step for inductor's CUDA graphs (:func:`mark_step`)."""

    def __init__(self, backbone, batch: int, latent_hw: tuple[int, int], device: torch.device, seed: int = 0,
                 mark_steps: bool = False):
        self.device, self.mark_steps = device, mark_steps
        self.unet = backbone.unet.to(device).train()
        # As train_text_to_image.py: the frozen text encoder in the mixed-precision dtype.
        self.text_encoder = backbone.text_encoder.to(device, torch.bfloat16).requires_grad_(False)
        tok = backbone.tokenizer
        self.ids = tok(["a photo of a person"] * batch, padding="max_length", max_length=tok.model_max_length,
                       truncation=True, return_tensors="pt").input_ids.to(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        c = backbone.unet.config.in_channels
        self.latents = torch.randn(batch, c, *latent_hw, device=device, generator=gen)
        self.scheduler = DDPMScheduler(**SD15_SCHEDULER)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4, weight_decay=1e-2,
                                           fused=device.type == "cuda")
        self.batch = batch

    def __call__(self) -> torch.Tensor:
        mark_step(self.mark_steps)
        with torch.no_grad():
            text = self.text_encoder(self.ids)[0]
        noise = torch.randn_like(self.latents)
        t = torch.randint(0, 1000, (self.batch,), device=self.device)
        noisy = self.scheduler.add_noise(self.latents, noise, t)
        with autocast(self.device):
            pred = self.unet(noisy, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class PlainSampler:
    """diffusers-pipeline-style DDIM sampling with batched CFG (uncond and cond in one batch).

    With ``controlnet`` (a diffusers ControlNetModel) it runs as StableDiffusionControlNetPipeline
    does: the control net sees both CFG halves and its residuals go into the UNet. ``mark_steps``:
    each denoising step marked for inductor's CUDA graphs (:func:`mark_step`).
    """

    def __init__(self, backbone, batch: int, latent_hw: tuple[int, int], device: torch.device,
                 steps: int = 30, guidance: float = 7.5, controlnet=None,
                 weights_dtype: torch.dtype = torch.float32, decode: bool = True, seed: int = 0,
                 mark_steps: bool = False):
        self.device, self.batch, self.steps, self.guidance, self.decode = device, batch, steps, guidance, decode
        self.mark_steps = mark_steps
        self.unet = backbone.unet.to(device, weights_dtype).eval()
        self.codec = backbone.codec.to(device, weights_dtype).eval()
        self.controlnet = controlnet.to(device, weights_dtype).eval() if controlnet is not None else None
        te = backbone.text_encoder.to(device, weights_dtype).eval()
        tok = backbone.tokenizer
        ids = tok(["a photo of a person"] * batch + [""] * batch, padding="max_length",
                  max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad(), autocast(device):
            states = te(ids)[0]
        self.text = torch.cat([states[batch:], states[:batch]])  # [uncond | cond], as the pipelines
        gen = torch.Generator(device=device).manual_seed(seed)
        c = backbone.unet.config.in_channels
        self.noise = torch.randn(batch, c, *latent_hw, device=device, generator=gen)
        self.cond = None
        if controlnet is not None:
            h, w = latent_hw
            self.profile = torch.randn(2 * batch, c, h, w, device=device, generator=gen)
            self.cond = torch.randn(2 * batch, c, h, 2 * w, device=device, generator=gen)
        self.scheduler = DDIMScheduler.from_config({**SD15_SCHEDULER, "set_alpha_to_one": False})

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        self.scheduler.set_timesteps(self.steps, device=self.device)
        latents = self.noise * self.scheduler.init_noise_sigma
        with autocast(self.device):
            for t in self.scheduler.timesteps:
                mark_step(self.mark_steps)
                x = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
                down = mid = None
                if self.controlnet is not None:
                    # As icp's Appearance Net: the control net reads the [profile | target] canvas
                    # (twice as wide) and the target half of each level feeds the UNet.
                    canvas = torch.cat([self.profile, x], dim=-1)
                    down, mid = self.controlnet(canvas, t, encoder_hidden_states=self.text,
                                                controlnet_cond=self.cond, return_dict=False)
                    down = [d[..., d.shape[-1] // 2:] for d in down]
                    mid = mid[..., mid.shape[-1] // 2:]
                eps = self.unet(x, t, encoder_hidden_states=self.text, down_block_additional_residuals=down,
                                mid_block_additional_residual=mid).sample
                eps_u, eps_c = eps.float().chunk(2)
                eps = eps_u + self.guidance * (eps_c - eps_u)
                latents = self.scheduler.step(eps, t, latents).prev_sample
            if self.decode:
                mark_step(self.mark_steps)
                return self.codec.decode(latents)
        return latents
