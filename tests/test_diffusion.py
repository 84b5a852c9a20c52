"""icp.diffusion: the loss and the sampler as pure functions, against direct computations."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from icp import diffusion as D
from icp.models.backbone import SD15_SCHEDULER

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}


def scheduler(kind="ddpm", prediction_type="epsilon"):
    return SCHEDULERS[kind].from_config(DDPMScheduler(**{**SD15_SCHEDULER, "prediction_type": prediction_type}).config)


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_loss_is_the_mse_to_the_prediction_types_target(prediction_type):
    sched = scheduler(prediction_type=prediction_type)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy, noise, t = D.noise_latents(x0, sched, torch.Generator().manual_seed(1))
    # The draws: noise first, then timesteps, from the one generator.
    g = torch.Generator().manual_seed(1)
    assert torch.equal(noise, torch.randn(x0.shape, generator=g))
    assert torch.equal(t, torch.randint(0, 1000, (3,), generator=g))
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    direct = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction_type]
    target = D.prediction_target(sched, x0, noise, t)
    assert torch.allclose(target, direct, atol=1e-6)
    pred = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert torch.equal(D.denoising_loss(pred, target), ((pred.float() - target) ** 2).mean())


def test_given_timesteps_draw_only_the_noise():
    sched, x0 = scheduler(), torch.zeros(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    out = D.noise_latents(x0, sched, torch.Generator().manual_seed(0), timesteps=t)
    assert out.timesteps is t and torch.equal(out.noise, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))


def test_unknown_prediction_type_is_refused():
    sched = scheduler()
    sched.register_to_config(prediction_type="x0")
    with pytest.raises(ValueError, match="prediction_type"):
        D.prediction_target(sched, torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def toy_branches(x, t):
    """A tiny 'model': conditional and unconditional outputs that depend on x and t."""
    scale = (t.float() / 1000).view(-1, 1, 1, 1)
    return 0.5 * x * scale, 0.1 * x - scale


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_sampler_with_guidance_is_the_hand_written_loop(kind):
    noise = D.initial_noise((2, 4, 8, 8), torch.Generator().manual_seed(0))
    assert torch.equal(noise, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(5)  # DDPM steps draw from the global generator
    got = D.sample(D.classifier_free_guidance(toy_branches, 3.0), noise, scheduler(kind), num_steps=6)

    sched = scheduler(kind)
    sched.set_timesteps(6)
    latents = noise * sched.init_noise_sigma
    torch.manual_seed(5)
    for t in sched.timesteps:
        x = sched.scale_model_input(latents, t)
        cond, uncond = toy_branches(x, t.expand(2))
        latents = sched.step(uncond + 3.0 * (cond - uncond), t, latents).prev_sample
    assert torch.equal(got, latents)


def test_sampler_gives_the_model_its_timesteps_on_the_model_device():
    seen = []

    def denoiser(x, t):
        seen.append((t.dtype, tuple(t.shape)))
        return torch.zeros_like(x)

    D.sample(denoiser, torch.randn(3, 4, 4, 4), scheduler("ddim"), num_steps=4, model_device="cpu")
    assert seen == [(torch.int64, (3,))] * 4


def test_guidance_one_is_the_conditional_branch():
    cond, uncond = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(D.guide(cond, uncond, 1.0), cond)
    assert torch.equal(D.guide(cond, uncond, 0.0), uncond)
