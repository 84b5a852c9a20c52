"""StitchingTask: the loss learns, sample() works, Lightning training writes grids and lean checkpoints."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from icp.data import keys as K
from icp.core.errors import WeightsError
from icp.models import backbone as B
from icp.eval.samples import SampleGrid
from icp.tasks.stitching import StitchingTask


pytestmark = pytest.mark.usefixtures("one_thread")


RES = 32


def make_batch(b=2, seed=0):
    """Random tensors shaped like a ShardDataModule batch (icp/data/keys.py)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, 3, RES, RES, generator=g) * 2 - 1
    keep = (torch.rand(b, 1, RES // 4, RES // 4, generator=g) > 0.8).float()
    keep = keep.repeat_interleave(4, -1).repeat_interleave(4, -2)
    return {K.PROFILE: torch.rand(b, 3, RES, RES, generator=g) * 2 - 1, K.TARGET: target,
            K.TARGET_MASKED: target * keep, K.TARGET_KEEP: keep}


def make_task(**kwargs):
    torch.manual_seed(0)
    return StitchingTask(B.tiny(resolution=RES, width=16), **kwargs)


def test_loss_falls_on_a_fixed_batch():
    task = make_task(train_unet="full", cond_drop_prob=0.0)
    batch = make_batch()
    opt = torch.optim.Adam(task.trainable_parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        # Same noise and timesteps every step: the fixed batch must be fitted.
        loss = task.losses(batch, generator=torch.Generator().manual_seed(0))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses


def test_prompt_cache_matches_the_text_encoder():
    task = make_task()
    prompts = ["a photo of a person", "", "a photo of a person", "portrait lit from the left"]
    cached = task.encode_prompts(prompts)
    direct = task.backbone.encode_text(prompts)
    assert torch.allclose(cached, direct, atol=1e-6) and not torch.allclose(cached[0], cached[3])
    assert torch.equal(task.encode_prompts(prompts), cached)


def test_sample_is_finite_shaped_and_seeded():
    task = make_task()
    batch = make_batch(b=3)
    a = task.sample(batch, num_steps=4, generator=torch.Generator().manual_seed(1))
    b = task.sample(batch, num_steps=4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, RES, RES) and torch.isfinite(a).all()
    assert a.min() >= -1 and a.max() <= 1 and torch.equal(a, b)
    assert task.training  # sample() restores the mode it found


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sampler_recovers_the_target_with_an_oracle_model(prediction_type):
    # The sampling loop itself (scheduler, scaling, CFG, decoding) is exact: a model that always
    # predicts the true quantity for the target brings pure noise back to the target.
    from diffusers import DDPMScheduler

    task = make_task()
    task.backbone.noise_scheduler = DDPMScheduler(**{**B.SD15_SCHEDULER, "prediction_type": prediction_type})
    batch = make_batch()
    x0 = task.encode_images(batch[K.TARGET])
    alphas = task.backbone.noise_scheduler.alphas_cumprod

    def oracle(latents, timesteps, text_states, residuals=None):
        # Batched CFG (model.perf.batched_cfg) calls it with [cond | uncond]: x0 for both halves.
        target = x0.repeat(latents.shape[0] // x0.shape[0], 1, 1, 1)
        a = alphas[timesteps].view(-1, 1, 1, 1)
        eps = (latents - a.sqrt() * target) / (1 - a).sqrt()
        return {"epsilon": eps, "sample": target, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * target}[prediction_type]

    task.unet = oracle
    out = task.sample(batch, num_steps=10, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert ((out - batch[K.TARGET]) ** 2).mean() < 5e-3


def test_condition_reaches_the_output_once_projections_learn():
    task = make_task()
    with torch.no_grad():
        for p in task.appearance.proj_down.parameters():
            p.normal_(0, 0.2)
    batch, other = make_batch(seed=0), make_batch(seed=0)
    other[K.PROFILE] = -other[K.PROFILE]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert not torch.allclose(task.sample(batch, 3, 1.0, g()), task.sample(other, 3, 1.0, g()))


def test_gradient_checkpointing_keeps_gradients():
    grads = []
    for checkpointing in (False, True):
        task = make_task(train_unet="frozen", gradient_checkpointing=checkpointing, cond_drop_prob=0.0)
        with torch.no_grad():  # non-zero projections, so gradients reach the Appearance Net's body
            for p in task.appearance.proj_down.parameters():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        task.setup("fit")
        assert task.backbone.unet.is_gradient_checkpointing is checkpointing
        task.losses(make_batch(), generator=torch.Generator().manual_seed(0))["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in task.trainable_parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_lora_mode_trains_adapters_only():
    task = make_task(train_unet="lora", lora_rank=2)
    names = [n for n, p in task.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("appearance.") for n in names)
    assert any("lora_" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in task.backbone.unet.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam(task.trainable_parameters(), lr=1e-2)
    task.losses(make_batch())["loss"].backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in task.backbone.unet.named_parameters() if n in frozen)


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {k: v[0] for k, v in make_batch(b=1, seed=i % 4).items()}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_fit_writes_grids_and_lean_checkpoints(tmp_path, precision):
    task = make_task(train_unet="lora", lora_rank=2, ema_decay=0.9)
    loader = DataLoader(Pairs(), batch_size=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, precision=precision, default_root_dir=tmp_path,
                        callbacks=[SampleGrid(every_n_steps=2, num_samples=2, num_steps=2)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0)
    trainer.fit(task, loader, loader)
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["step_00000002.png", "step_00000004.png"]
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and "val/loss" in trainer.callback_metrics
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    trained = {n for n, p in task.named_parameters() if p.requires_grad}
    assert set(state["state_dict"]) >= trained
    assert not any(k.startswith("backbone.text_encoder.") for k in state["state_dict"])  # frozen: not stored
    assert not any(".base_layer." in k for k in state["state_dict"])  # LoRA-wrapped frozen UNet weights neither
    assert state["ema"]["optimization_step"] == 4
    # Reload into a fresh task built from the same backbone path: trained weights and EMA come back.
    fresh = StitchingTask.load_from_checkpoint(ckpt, backbone=B.tiny(resolution=RES, width=16))
    for name, p in fresh.named_parameters():
        # Under bf16-mixed the frozen parts trained in bf16 (model.perf.bf16_frozen); the reload
        # has them in fp32 again from the backbone path: equal once rounded to bf16.
        trained_p = dict(task.named_parameters())[name]
        assert p.dtype == torch.float32 and torch.equal(p.to(trained_p.dtype), trained_p), name
    assert all(torch.equal(a, b) for a, b in zip(fresh._ema.shadow_params, task._ema.shadow_params))


def test_checkpoint_drops_only_frozen_backbone_weights():
    task = make_task(train_unet="frozen")
    task.appearance.proj_mid.requires_grad_(False)  # a frozen task net is not reloadable from a path
    ckpt = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(ckpt)
    assert "appearance.proj_mid.weight" in ckpt["state_dict"]
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])
    fresh = make_task(train_unet="frozen")
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])  # strict: everything else still checked
    del ckpt["state_dict"]["appearance.net.conv_in.weight"]
    with pytest.raises(WeightsError):
        make_task(train_unet="frozen").on_load_checkpoint(ckpt)
