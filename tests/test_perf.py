"""icp.perf switches give the plain path's results (within bf16 tolerance) on CPU, and the task
wiring (``model.perf``) applies them: per switch the loss on the same batch and noise, batched
CFG against two UNet calls, the all-off path against the sampling loop as it was before."""

from __future__ import annotations

import functools
import types

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from icp import perf
from icp.data import keys as K
from icp.core.errors import ConfigError
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


# ------------------------------------------------------------------------------ building blocks


def test_bf16_frozen_matches_fp32_weights_under_autocast():
    ref = tiny(resolution=32, width=32, seed=1).unet.eval()
    fast = tiny(resolution=32, width=32, seed=1).unet.eval()
    perf.bf16_frozen(fast)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in fast.parameters())
    with torch.no_grad():
        a, b = _unet_loss(ref, return_pred=True), _unet_loss(fast, return_pred=True)
        # bf16 tolerance (bf16 has 8 mantissa bits); autocast already ran the fp32 weights in bf16.
        assert _norm_rel(b, a) < 2e-2
        # Not vacuous: another seed's weights predict something clearly different.
        other = tiny(resolution=32, width=32, seed=2).unet.eval()
        assert _norm_rel(_unet_loss(other, return_pred=True), a) > 0.2


def test_channels_last_same_loss_and_grads():
    ref = tiny(resolution=32, width=32, seed=3).unet
    fast = tiny(resolution=32, width=32, seed=3).unet
    perf.channels_last(fast)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast.parameters())
    la = _unet_loss(ref, autocast=False)
    lb = _unet_loss(fast, memory_format=torch.channels_last, autocast=False)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, rtol=1e-4, atol=1e-6)
    assert _rel(fast.conv_in.weight.grad, ref.conv_in.weight.grad) < 1e-3


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_sdpa_backend_same_attention(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=gen) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    with perf.sdpa_backend(backend):
        out = F.scaled_dot_product_attention(q, k, v)
    assert _rel(out, ref) < 1e-4
    perf.set_sdpa_backend(backend)
    assert _rel(F.scaled_dot_product_attention(q, k, v), ref) < 1e-4


def test_regional_compile_counts_blocks_and_keeps_results():
    ref = tiny(resolution=32, width=32, seed=4).unet.eval()
    fast = tiny(resolution=32, width=32, seed=4).unet.eval()
    keys = set(fast.state_dict())
    # aot_eager traces forward and backward like inductor but generates no code: fast on CPU.
    n = perf.compile_module(fast, mode="default", regional=True, backend="aot_eager")
    blocks = [m for m in ref.modules() if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel")]
    assert n == len(blocks) > 0
    assert set(fast.state_dict()) == keys  # checkpoints of a compiled task load into a plain one
    assert perf.compile_module(fast, mode="none") == 0
    with torch.no_grad():
        a, b = _unet_loss(ref, autocast=False), _unet_loss(fast, autocast=False)
    assert torch.allclose(a, b, rtol=1e-5)


def test_graphs_are_plain_calls_off_cuda():
    fn = torch.nn.Linear(3, 3)
    step = perf.GraphedStep(fn)
    x = torch.randn(2, 3)
    for _ in range(4):
        assert torch.equal(step(x), fn(x))
    assert not step.captured


def test_settings_merge_over_defaults_and_refuse_bad_keys():
    assert perf.settings(None) == perf.DEFAULTS
    assert perf.settings({"compile": False})["compile"] == "none"
    assert set(perf.OFF) == set(perf.DEFAULTS)
    with pytest.raises(ConfigError, match="model.perf.turbo"):
        perf.settings({"turbo": True})
    with pytest.raises(ConfigError, match="model.perf.compile"):
        perf.settings({"compile": "fastest"})
    with pytest.raises(ConfigError, match="model.perf.sdpa"):
        perf.settings({"sdpa": "fastest"})
    with pytest.raises(ConfigError, match="model.perf.batched_cfg"):
        perf.settings({"batched_cfg": "yes"})
    with pytest.raises(ConfigError, match="model.perf.channels_last='sometimes' must be true or false, or auto"):
        perf.settings({"channels_last": "sometimes"})
    with pytest.raises(ConfigError, match="perf.sdpa"):
        perf.set_sdpa_backend("fastest")
    with pytest.raises(ConfigError, match="perf.compile"):
        perf.compile_module(torch.nn.Linear(2, 2), mode="turbo")


def test_channels_last_auto_means_where_compiled_on_cuda():
    auto = perf.settings({"channels_last": "auto"})
    assert perf.use_channels_last(auto, "cuda") and not perf.use_channels_last(auto, "cpu")
    assert not perf.use_channels_last({**auto, "compile": "none"}, "cuda")  # eager NHWC measured slower
    assert perf.use_channels_last(perf.settings({"channels_last": True}), "cpu")
    assert not perf.use_channels_last(perf.settings({"channels_last": False}), "cuda")
    task = _stitching()  # project defaults on CPU: weights stay NCHW
    assert task.configure_perf(precision="bf16-mixed", device="cpu")["channels_last"] is False
    assert task.backbone.unet.conv_in.weight.is_contiguous()


def test_cudnn_benchmark_is_set_for_cuda_only_and_never_switched_off(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    task = _stitching({"cudnn_benchmark": True, "compile": "none"})
    assert "cudnn_benchmark" not in task.configure_perf(precision="bf16-mixed", device="cpu")
    assert torch.backends.cudnn.benchmark is False
    # Applied as for a CUDA run (nothing else of it needs a GPU with compile off).
    applied = perf.configure_task(_stitching(), {"cudnn_benchmark": True, "compile": "none"}, device="cuda")
    assert applied["cudnn_benchmark"] and torch.backends.cudnn.benchmark is True
    # Off leaves a trainer's own choice (Trainer(benchmark=True)) in place.
    perf.configure_task(_stitching(), {"compile": "none"}, device="cuda")
    assert torch.backends.cudnn.benchmark is True


def test_whole_net_compile_wraps_the_modules_that_run():
    """compile_regional=false compiles whole nets: a VAE codec runs encode/decode, never forward,
    so its encoder and decoder are what gets compiled; a UNet is compiled as itself."""
    parts = tiny(resolution=RES, width=32, codec="vae", seed=1)
    assert perf._called_nets(parts.codec) == [parts.codec.vae.encoder, parts.codec.vae.decoder]
    assert perf._called_nets(parts.unet) == [parts.unet]


def test_compile_plan_regional_whole_and_codec_whole():
    from icp.tasks.adaptation import AdaptationTask

    task = AdaptationTask(tiny(resolution=RES, width=16, codec="vae", seed=6), cond_drop_prob=0.0)
    vae = task.backbone.codec.vae
    by_block = perf.settings({"compile_codec_whole": False})
    plan = {id(m): (type(m).__name__, regional) for m, regional in perf.compile_plan(task, by_block)}
    assert plan[id(task.backbone.unet)][1] and plan[id(task.backbone.codec)][1]  # by block
    assert all(not regional for name, regional in plan.values() if name in perf.GLUE_MODULES)
    assert any(name in perf.GLUE_MODULES for name, _ in plan.values())
    whole_codec = perf.compile_plan(task, perf.settings())  # the default: the codec whole
    assert [(m, r) for m, r in whole_codec if m in (vae.encoder, vae.decoder)] == [(vae.encoder, False),
                                                                                 (vae.decoder, False)]
    assert all(m is not task.backbone.codec for m, _ in whole_codec)
    assert dict((id(m), r) for m, r in whole_codec)[id(task.backbone.unet)]  # the UNet stays regional
    everything_whole = perf.compile_plan(task, perf.settings({"compile_regional": False}))
    assert not any(regional for _, regional in everything_whole)


def test_vae_encoder_and_decoder_trace_whole():
    """compile_codec_whole hands inductor the VAE encoder and decoder as one graph each, with the
    wide-head matmul attention CUDA gives them: traced here through aot_eager (no C++ compile on
    CPU), no graph break, the same latents and images."""
    import torch._dynamo as dynamo

    codec = tiny(resolution=RES, width=32, codec="vae", seed=2).codec.eval()
    assert perf.wide_head_attention(codec, limit=0, max_scores=2 ** 12) > 0  # chunked, as on CUDA
    images = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref_latents = codec.encode(images)
        ref_images = codec.decode(ref_latents)
        dynamo.reset()
        dynamo.utils.counters.clear()
        for net in perf._called_nets(codec):
            net.compile(backend="aot_eager")
        latents = codec.encode(images)
        decoded = codec.decode(latents)
    assert not dynamo.utils.counters["graph_break"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert torch.allclose(latents, ref_latents, atol=1e-5) and torch.allclose(decoded, ref_images, atol=1e-5)
    dynamo.reset()


def test_inductor_options_go_over_the_compile_mode(monkeypatch):
    """force_layout_opt reaches torch.compile as an inductor option merged over the mode's own
    (torch.compile takes a mode or options, not both)."""
    assert perf.inductor_options(perf.settings({"force_layout_opt": False})) == {}
    options = perf.inductor_options(perf.settings())  # the default forces the layout
    assert options == {"force_layout_optimization": True}
    # Inductor checks option names when torch.compile is called: these are real ones.
    torch.compile(torch.nn.Linear(2, 2), options=options)
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(kwargs))
    perf.compile_module(torch.nn.Linear(2, 2), mode="max-autotune-no-cudagraphs", regional=False, options=options)
    perf.compile_module(torch.nn.Linear(2, 2), mode="default", regional=False)
    assert seen[0]["options"] == {"max_autotune": True, "coordinate_descent_tuning": True,
                                  "force_layout_optimization": True} and "mode" not in seen[0]
    assert seen[1]["mode"] == "default" and "options" not in seen[1]


def test_training_steps_are_marked_for_inductor_cuda_graphs(monkeypatch):
    """compile: reduce-overhead (inductor's CUDA graphs; the training default) marks each training
    step's start; the compile mode "default" records no graphs and is left alone."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    assert perf.uses_cudagraphs(perf.settings({"compile": "reduce-overhead"}))
    assert not perf.uses_cudagraphs(perf.settings()) and not perf.uses_cudagraphs(perf.OFF)
    assert perf.uses_cudagraphs(perf.training_settings(perf.settings()))
    _stitching({"train": {}}).on_train_batch_start(_batch(), 0)
    assert marks == []
    _stitching().on_train_batch_start(_batch(), 0)
    assert marks == [1]


def test_train_overrides_apply_to_training_runs_only(monkeypatch):
    """model.perf.train: switches over the top level for a training run (its compile, its
    validation samples); evaluation (prepare_inference) keeps the top level."""
    node = {"train": {"compile": "reduce-overhead", "compile_regional": False}}
    s = perf.settings(node)
    assert s["train"] == node["train"] and s["compile"] == "default"
    assert perf.training_settings(s)["compile"] == "reduce-overhead"
    assert perf.training_settings(perf.settings({"train": {}}))["compile"] == "default"  # no override
    assert perf.training_settings(perf.settings())["compile"] == "reduce-overhead"  # the default one
    with pytest.raises(ConfigError, match="model.perf.train.turbo is not a performance switch"):
        perf.settings({"train": {"turbo": True}})
    with pytest.raises(ConfigError, match="model.perf.train.compile='fastest'"):
        perf.settings({"train": {"compile": "fastest"}})
    with pytest.raises(ConfigError, match="model.perf.train.train"):
        perf.settings({"train": {"train": {}}})
    with pytest.raises(ConfigError, match="model.perf.train=.* must be a mapping"):
        perf.settings({"train": "reduce-overhead"})

    seen = []
    monkeypatch.setattr(perf, "compile_module",
                        lambda net, mode, regional=True, **_: seen.append((net, mode, regional)) or 1)
    trained = _stitching(node)
    perf.configure_task(trained, trained.perf_config, device="cuda")  # the compile path, recorded
    unet = trained.backbone.unet
    assert (unet, "reduce-overhead", False) in seen
    assert all(mode == "reduce-overhead" for _, mode, _ in seen)
    seen.clear()
    evaluated = _stitching(node)
    perf.configure_inference(evaluated, evaluated.perf_config, device="cuda", bf16=False)
    assert (evaluated.backbone.unet, "default", True) in seen
    assert all(mode == "default" for _, mode, _ in seen)
    # What the task reads while it runs (step marks, sampling graphs) follows the same split.
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    fresh = _stitching(node)
    assert fresh.perf_active["compile"] == "reduce-overhead"  # a training run, before and after setup
    fresh.on_train_batch_start(_batch(), 0)
    assert marks == [1]
    fresh.prepare_inference(device="cpu", compile=False)
    assert fresh.perf_active["compile"] == "default" and fresh.perf_active is fresh.perf_config


def test_fused_optimizer_only_for_unset_adam_on_cuda():
    cuda = [types.SimpleNamespace(is_cuda=True, is_floating_point=lambda: True)]
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3)
    fused = perf.fused_optimizer(adamw, cuda)
    assert fused.keywords == {"lr": 1e-3, "fused": True} and fused.func is torch.optim.AdamW
    assert perf.fused_optimizer(adamw, cpu) is adamw  # fused AdamW needs CUDA tensors
    chosen = functools.partial(torch.optim.AdamW, lr=1e-3, foreach=False)
    assert perf.fused_optimizer(chosen, cuda) is chosen  # the user's explicit choice stands
    sgd = functools.partial(torch.optim.SGD, lr=1e-3)
    assert perf.fused_optimizer(sgd, cuda) is sgd


# ------------------------------------------------------------------------------ task wiring


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


# One row per switch: the plain path with only that switch at its project default.
SWITCHES = [k for k in perf.DEFAULTS if perf.DEFAULTS[k] != perf.OFF[k]] + ["sdpa=math", "channels_last=on"]


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_keeps_the_loss_within_bf16_tolerance(switch):
    key, _, value = switch.partition("=")
    node = {**perf.OFF, key: {"on": True, "": perf.DEFAULTS[key]}.get(value, value)}
    plain, fast = _stitching(perf.OFF), _stitching(node)
    plain.configure_perf(precision="bf16-mixed", device="cpu")
    applied = fast.configure_perf(precision="bf16-mixed", device="cpu")
    assert applied["compiled"] == 0  # compilation is for CUDA only
    if key == "bf16_frozen":
        assert applied["bf16_frozen"] > 0 and fast.backbone.unet.conv_in.weight.dtype == torch.bfloat16
        assert fast.appearance.net.conv_in.weight.dtype == torch.float32  # trained: stays fp32
    (a, ga), (b, gb) = _loss_and_grads(plain), _loss_and_grads(fast)
    assert abs(a - b) / a < 1e-2, (a, b)
    assert _norm_rel(gb, ga) < 5e-2
    # Not vacuous: another batch moves the gradient far more than the switch does.
    assert _norm_rel(_loss_and_grads(fast, seed=1)[1], gb) > 0.3


def test_bf16_frozen_only_under_a_bf16_precision():
    task = _stitching()
    assert task.configure_perf(precision="32-true", device="cpu")["bf16_frozen"] == 0
    assert task.backbone.unet.conv_in.weight.dtype == torch.float32


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


def test_sampling_settings_off_is_the_old_loop_and_batched_cfg_equals_it():
    batch = _batch()
    off, fast = _stitching(perf.OFF), _stitching()
    old = _old_sample(off, batch, 3, 3.0, torch.Generator().manual_seed(3))
    assert torch.equal(_sample(off, batch), old)
    batched = _sample(fast, batch)  # project defaults on CPU: batched CFG, fp32
    assert _rel(batched, old) < 1e-5
    # Not vacuous: the condition matters (the residuals are not zero).
    swapped = {**batch, K.PROFILE: batch[K.PROFILE].flip(0)}
    assert _rel(_sample(fast, swapped), batched) > 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler"])
def test_schedulers_step_on_host_timesteps_as_on_device_ones(sampler, monkeypatch):
    """sample() steps the scheduler on host timesteps (no read-back per step on CUDA) and gives the
    model its own copy on the task's device: the same images as the old loop, every sampler. (On
    CPU both sides are the host; what the split saves is measured by the GPU bench, row d.)"""
    batch = _batch()
    task = _stitching(perf.OFF, sampler=sampler)
    torch.manual_seed(0)  # DDPM's step draws its noise from the global generator
    old = _old_sample(task, batch, 3, 3.0, torch.Generator().manual_seed(3))
    seen = {"scheduler": set(), "model": set()}
    unet = task.unet

    def spy_unet(latents, timesteps, *args, **kwargs):
        seen["model"].add(timesteps.device.type)
        return unet(latents, timesteps, *args, **kwargs)

    scheduler_class = type(task.backbone.sampling_scheduler(sampler))
    step = scheduler_class.step

    def spy_step(self, model_output, timestep, *args, **kwargs):
        seen["scheduler"].add(torch.as_tensor(timestep).device.type)
        return step(self, model_output, timestep, *args, **kwargs)

    monkeypatch.setattr(task, "unet", spy_unet)
    monkeypatch.setattr(scheduler_class, "step", spy_step)
    torch.manual_seed(0)
    assert torch.equal(_sample(task, batch), old)
    assert seen == {"scheduler": {"cpu"}, "model": {task.device.type}}


def test_batched_cfg_with_adaptation_and_extra_profiles():
    from icp.tasks.adaptation import EXTRA_PROFILES, AdaptationTask

    def task(node):
        torch.manual_seed(0)
        t = AdaptationTask(tiny(resolution=RES, width=16, seed=6), cond_drop_prob=0.0, perf=node)
        with torch.no_grad():
            for p in t.fusion.parameters():
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
        return t

    batch = {**_batch(), EXTRA_PROFILES: [_batch(seed=2)[K.PROFILE]]}
    a, b = _sample(task(perf.OFF), batch, steps=2), _sample(task(None), batch, steps=2)
    assert _rel(b, a) < 1e-5


def test_sample_with_bf16_frozen_weights_outside_a_trainer():
    batch = _batch()
    ref = _sample(_stitching(), batch)
    fast = _stitching()
    fast.configure_perf(precision="bf16-mixed", device="cpu")  # as a bf16-mixed fit leaves it
    assert fast.backbone.unet.conv_in.weight.dtype == torch.bfloat16 and fast._trainer is None
    out = _sample(fast, batch)  # autocasts by itself: fp32 latents never meet bf16 weights
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _norm_rel(out, ref) < 5e-2


def test_inference_stores_every_weight_in_bf16_and_samples_like_fp32():
    batch = _batch()
    ref = _sample(_stitching(), batch)
    fast = _stitching()
    applied = fast.prepare_inference("cpu")  # CPU default: nothing changes
    assert applied["inference"] and applied["bf16_frozen"] == 0 and applied["compiled"] == 0
    assert torch.equal(_sample(fast, batch), ref)
    assert fast.prepare_inference("cpu") is applied  # once
    fast = _stitching()
    # What evaluation does on CUDA (bf16_frozen + sample_bf16), forced here on CPU.
    fast.perf_applied = perf.configure_inference(fast, fast.perf_config, device="cpu", bf16=True)
    floats = [p for p in fast.parameters() if p.is_floating_point()]
    assert all(p.dtype == torch.bfloat16 for p in floats)
    assert fast.perf_applied["bf16_frozen"] == sum(p.numel() for p in floats)
    assert fast.trainable_parameters()  # requires_grad kept: the EMA bookkeeping selects by it
    out = _sample(fast, batch)  # autocasts: fp32 latents never meet bf16 weights
    assert out.dtype == torch.float32 and _norm_rel(out, ref) < 5e-2
    # Not vacuous: another profile moves the output far more than bf16 does.
    swapped = {**batch, K.PROFILE: batch[K.PROFILE].flip(0)}
    assert _norm_rel(_sample(fast, swapped), out) > 4 * _norm_rel(out, ref)


def test_inference_folds_the_ema_weights_in_once():
    batch = _batch()
    task = _stitching(ema_decay=0.9)
    task._ensure_ema()  # shadow = the current weights
    live = [p.detach().clone() for p in task.trainable_parameters()]
    with torch.no_grad():
        for p in task.trainable_parameters():
            p.add_(0.05)  # training moved on; the EMA did not
    ref = _sample(task, batch)  # swaps the EMA weights in for the call
    task.prepare_inference("cpu")
    assert task._ema is None and task.ema_decay == 0.0
    assert all(torch.equal(p, q) for p, q in zip(task.trainable_parameters(), live))
    assert torch.equal(_sample(task, batch), ref)


def test_accumulation_drops_inductors_cuda_graphs_from_the_training_compile():
    """CUDA graphs reuse output memory between replays, so gradients kept across micro-batches
    would be overwritten (pytorch/pytorch#169545): with accumulation, the training compile keeps
    its kernels without graphs; evaluation's top level and non-graph modes are left alone."""
    override = perf.settings({"train": {"compile": "reduce-overhead", "compile_regional": False}})
    guarded = perf.guard_accumulation(override, 2)
    assert perf.training_settings(guarded)["compile"] == "default"
    assert guarded["train"]["compile_regional"] is False and guarded["compile"] == override["compile"]
    assert not perf.uses_cudagraphs(perf.training_settings(guarded))
    top = perf.settings({"compile": "max-autotune", "train": {}})
    assert perf.training_settings(perf.guard_accumulation(top, 4))["compile"] == "max-autotune-no-cudagraphs"
    assert perf.guard_accumulation(top, 4)["compile"] == "max-autotune"  # evaluation keeps its graphs
    for s, steps in ((override, 1), (perf.settings({"train": {}}), 8)):
        assert perf.guard_accumulation(s, steps) is s


def test_trainer_with_accumulation_trains_without_cuda_graphs(tmp_path, caplog):
    task = _stitching({"train": {"compile": "reduce-overhead", "compile_regional": False}}, train_unet="frozen")
    assert perf.uses_cudagraphs(task.perf_active)
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
                        default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    with caplog.at_level("WARNING", logger="icp.tasks.base"):
        trainer.fit(task, DataLoader(_Pairs(), batch_size=2))
    assert task.perf_active["compile"] == "default" and not perf.uses_cudagraphs(task.perf_active)
    assert "accumulated over 2 micro-batches" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's CUDA graphs exist on CUDA only")
def test_default_training_override_trains_validates_samples_and_accumulates_on_cuda(tmp_path):
    """The default training override (whole nets under inductor's CUDA graphs) through a real
    Trainer, on both tasks: a sanity validation before the first step and validation after an
    epoch (no-grad chains of compiled nets: control nets -> UNet), steps with a finite, changing
    loss, samples and flows while attached to the trainer; and accumulation, which must train
    without the graphs and sum the same gradient as an eager run."""
    from icp.tasks.adaptation import AdaptationTask

    losses, grads, seen = [], [], {}
    batch = {k: v.cuda() for k, v in _batch().items()}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            losses.append(float(outputs["loss"]))
            if trainer.global_step == 2 and not grads:  # as the samples callback does, mid-training
                seen["images"] = [_sample(pl_module, batch) for _ in range(2)]  # the second replays
                if isinstance(pl_module, AdaptationTask):
                    first = pl_module.predict_flow(batch, generator=torch.Generator("cuda").manual_seed(1))
                    seen["kept"] = [f.clone() for f in first]
                    pl_module.predict_flow(batch, generator=torch.Generator("cuda").manual_seed(2))  # a later step
                    seen["flows"] = first

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.accumulate_grad_batches > 1:
                grads.append(torch.cat([p.grad.flatten().float() for p in pl_module.trainable_parameters()]))

    def fit(task, accumulate=1, steps=3, validate=True):
        trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, accelerator="gpu", devices=1,
                            precision="bf16-mixed", logger=False, default_root_dir=tmp_path,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=1 if validate else 0, limit_val_batches=1 if validate else 0,
                            callbacks=[Record()])
        trainer.fit(task, DataLoader(_Pairs(), batch_size=2), DataLoader(_Pairs(), batch_size=2))
        return task, trainer

    torch.manual_seed(0)
    for task in (_stitching(train_unet="frozen"), AdaptationTask(tiny(resolution=RES, width=32, seed=6))):
        losses.clear()
        seen.clear()
        task, trainer = fit(task)
        assert perf.uses_cudagraphs(task.perf_active) and task.perf_applied["compiled"] >= 2
        assert len(losses) == 3 and all(map(torch.isfinite, map(torch.tensor, losses))) and losses[0] != losses[1]
        assert torch.isfinite(trainer.callback_metrics["val/loss"])
        for images in seen["images"]:
            assert images.shape == (2, 3, RES, RES) and torch.isfinite(images).all()
        if isinstance(task, AdaptationTask):
            flows = seen["flows"]
            assert all(torch.isfinite(f).all() for f in flows) and all(map(torch.equal, flows, seen["kept"]))
        torch._dynamo.reset()
    guarded, _ = fit(_stitching(train_unet="frozen"), accumulate=2, steps=1, validate=False)
    assert not perf.uses_cudagraphs(guarded.perf_active)
    torch._dynamo.reset()
    fit(_stitching({"compile": "none", "train": {}}, train_unet="frozen"), accumulate=2, steps=1, validate=False)
    # The summed gradient of both micro-batches (a kept-and-overwritten first one would be off by
    # far more than bf16 rounding: pytorch#169545 saw a quarter of it).
    assert len(grads) == 2 and (grads[0] - grads[1]).norm() < 0.05 * grads[1].norm()


def test_lagged_progress_loss_changes_nothing_off_cuda(tmp_path):
    """lagged_progress_loss reads the bar's loss one step late on CUDA only; on CPU there is no
    wait to avoid, so the bar and the logged metrics are as without it (the CUDA path is timed by
    the bench, plan h200_b5)."""
    assert torch.equal(perf.LaggedScalar().push(torch.tensor(2.0)), torch.tensor(2.0))
    shown = {}
    for switch in (False, True):
        task = _stitching({"lagged_progress_loss": switch}, train_unet="frozen")
        trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0)
        trainer.fit(task, DataLoader(_Pairs(), batch_size=2))
        shown[switch] = (sorted(trainer.progress_bar_metrics), float(trainer.callback_metrics["train/loss"]))
    assert shown[True][0] == shown[False][0] == ["train/loss"]
    assert shown[True][1] == pytest.approx(shown[False][1], rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the lagged read exists on CUDA only")
def test_lagged_progress_loss_shows_the_previous_steps_loss_on_cuda():
    """On CUDA the bar's ``loss`` after step k is step k-1's loss (none after the first step)."""
    losses, shown = [], []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step:  # (batch_idx restarts each epoch)
                shown.append(trainer.progress_bar_metrics.get("loss"))  # after the previous step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    task = _stitching({"lagged_progress_loss": True, "compile": "none"}, train_unet="frozen")
    trainer = L.Trainer(max_steps=4, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Record()])
    trainer.fit(task, DataLoader(_Pairs(), batch_size=2))
    assert len(losses) == 4 and shown[0] is None and len(shown) == 3
    assert shown[1:] == pytest.approx(losses[:2], rel=1e-6) and losses[0] != losses[1]
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(losses[-1], rel=1e-6)  # exact


def test_foreach_ema_steps_like_the_per_tensor_loop():
    """foreach_ema hands the EMA to diffusers' multi-tensor path: the same shadow weights."""
    loop, fused = _stitching(ema_decay=0.9), _stitching({"foreach_ema": True}, ema_decay=0.9)
    assert not loop._ensure_ema().foreach and fused._ensure_ema().foreach
    for step in range(3):
        for task in (loop, fused):
            with torch.no_grad():
                for i, p in enumerate(task.trainable_parameters()):
                    p.add_(0.01 * (step + 1) * (i % 5 - 2))  # the same update on both
            task.on_train_batch_end(None, None, step)
    pairs = list(zip(loop._ema.shadow_params, fused._ema.shadow_params))
    assert pairs and all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in pairs)
    live = list(loop.trainable_parameters())
    assert any(not torch.allclose(a, p) for (a, _), p in zip(pairs, live))  # not vacuous: the EMA lags


def _vae_attention(width=320):
    """An SD-VAE mid-block attention block (one head as wide as the channels)."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=width, heads=1, dim_head=width, norm_num_groups=32, residual_connection=True,
                     bias=True, upcast_softmax=True, _from_deprecated_attn_block=True, eps=1e-6,
                     rescale_output_factor=1.0).eval()


def test_wide_heads_run_as_chunked_matmul_with_the_same_result(monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor

    attn, x = _vae_attention(), torch.randn(5, 320, 6, 6)
    narrow = _vae_attention(width=64)
    with torch.no_grad():
        ref = attn(x)
        # Only heads wider than the limit change processor (the SD VAE's 512 > 256).
        assert perf.wide_head_attention(narrow) == 0 and perf.wide_head_attention(attn) == 1
        calls = []
        real = AttnProcessor.__call__
        monkeypatch.setattr(AttnProcessor, "__call__", lambda self, a, h, *r, **k: calls.append(h.shape[0])
                            or real(self, a, h, *r, **k))
        assert perf.wide_head_attention(attn) == 0  # once
        out = attn(x)  # default limit: one chunk of 5
        attn.set_processor(perf.WideHeadAttention(max_scores=2 * 36 * 36))
        chunked = attn(x)  # 2 samples of 36x36 scores per chunk
        attn.set_processor(perf.WideHeadAttention(max_scores=36 * 36 - 1))
        fallback = attn(x)  # one sample is over the limit: SDPA
    assert calls == [5, 2, 2, 1]
    for got in (out, chunked, fallback):
        assert _rel(got, ref) < 1e-5
    assert _rel(attn(torch.randn(5, 320, 6, 6)), ref) > 0.1  # not vacuous


def test_wide_heads_switch_applies_on_cuda_only():
    task = _stitching()  # tiny nets: no wide heads anyway; the switch is CUDA-only
    assert task.configure_perf(precision="bf16-mixed", device="cpu")["wide_heads"] == 0


def test_fused_qkv_for_inference_samples_like_the_separate_projections():
    batch = _batch()
    ref_task = _stitching()
    ref = _sample(ref_task, batch)
    fast = _stitching({"fuse_qkv": True})
    keys = set(fast.state_dict())
    applied = fast.prepare_inference("cpu")
    assert applied["fused_qkv"] > 0
    assert keys <= set(fast.state_dict())  # the separate projections stay (checkpoint keys)
    assert _rel(_sample(fast, batch), ref) < 1e-5
    swapped = {**batch, K.PROFILE: batch[K.PROFILE].flip(0)}
    assert _rel(_sample(fast, swapped), ref) > 1e-3  # not vacuous
    # Training never fuses: the switch is read by prepare_inference only.
    assert "fused_qkv" not in _stitching({"fuse_qkv": True}).configure_perf(precision="32-true", device="cpu")


def test_evaluation_keeps_one_graphed_step_whose_inputs_follow_each_call():
    task = _stitching().eval()
    task.prepare_inference("cpu")
    with torch.no_grad():
        states = [task.prepare_condition(_batch(seed=s)) for s in (0, 1)]
        text, uncond = task.text_states({}, 2), task.empty_text_states(2)
        x, tb = torch.randn(2, *states[0]["profile"].shape[1:]), torch.tensor([500, 500])
        first = task._graphed_prediction(states[0], text, uncond, 3.0)
        kept = task._sample_graph[1]
        got = [first(x, tb), task._graphed_prediction(states[1], text, uncond, 3.0)(x, tb)]
        assert task._sample_graph[1] is kept  # same shapes, guidance and weights: reused
        for state, out in zip(states, got):  # ... and each call's own condition went in
            assert torch.equal(out, task.guided_prediction(state, text, uncond, 3.0)(x, tb))
        assert _rel(got[1], got[0]) > 1e-3  # not vacuous: the two conditions differ
        task._graphed_prediction(states[0], text, uncond, 5.0)
        assert task._sample_graph[1] is not kept  # other guidance: a new step
        kept = task._sample_graph[1]
        perf.store_in(task, torch.bfloat16)  # weights moved: the kept graph would read stale memory
        task._graphed_prediction(states[0], text, uncond, 5.0)
        assert task._sample_graph[1] is not kept
    trainer_side = _stitching().eval()  # not prepared for evaluation: a step per call, none kept
    with torch.no_grad():
        trainer_side._graphed_prediction(trainer_side.prepare_condition(_batch()), text, uncond, 3.0)
    assert trainer_side._sample_graph is None


def _traced_loss_and_grads(task, part):
    """fp32 loss on a fixed batch, noise and timesteps, and ``part``'s gradients (compile-trace tests)."""
    task.zero_grad(set_to_none=True)
    loss = task.losses(_batch(), generator=torch.Generator().manual_seed(1))["loss"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in part.parameters() if p.grad is not None]


def test_adaptation_glue_modules_are_compile_targets_and_trace_whole():
    from icp.tasks.adaptation import AdaptationTask

    torch.manual_seed(0)
    task = AdaptationTask(tiny(resolution=RES, width=32, seed=6))
    names = [type(m).__name__ for m in perf._compile_targets(task)]
    assert names[-2:] == ["ReferenceFusion", "FlowMatcher"] and names.count("ControlUNet") == 2
    ref, ref_grads = _traced_loss_and_grads(task, task.matching)
    # What inductor is handed on CUDA, traced here through aot_eager (no C++ compile on CPU):
    # one graph each, no break, the same loss and the same Matching Net gradients.
    import torch._dynamo as dynamo

    dynamo.reset()
    dynamo.utils.counters.clear()
    for glue in (task.fusion, task.matcher):
        glue.compile(backend="aot_eager")
    out, grads = _traced_loss_and_grads(task, task.matching)
    assert not dynamo.utils.counters["graph_break"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert torch.equal(out, ref) and ref_grads and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    dynamo.reset()


def test_stitching_step_traces_whole_for_the_train_override():
    """What model.perf.train = {compile_regional: false} hands inductor for the stitching step:
    the generation UNet and the Appearance Net as one graph each (aot_eager on CPU), no graph
    break, the same loss and Appearance Net gradients as eager."""
    import torch._dynamo as dynamo

    task = _stitching(train_unet="frozen")
    ref, ref_grads = _traced_loss_and_grads(task, task.appearance)
    plan = perf.compile_plan(task, perf.training_settings(perf.settings({"train": {"compile_regional": False}})))
    nets = [net for net, regional in plan if not regional]
    assert task.backbone.unet in nets and task.appearance in nets and len(nets) == len(plan)
    dynamo.reset()
    dynamo.utils.counters.clear()
    for net in (task.backbone.unet, task.appearance):
        net.compile(backend="aot_eager")
    out, grads = _traced_loss_and_grads(task, task.appearance)
    assert not dynamo.utils.counters["graph_break"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert torch.allclose(out, ref, rtol=1e-5) and ref_grads
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, ref_grads))
    dynamo.reset()


def test_flow_prediction_after_bf16_inference_preparation():
    from icp.tasks.adaptation import AdaptationTask

    torch.manual_seed(0)
    task = AdaptationTask(tiny(resolution=RES, width=16, seed=6)).eval()
    ref = task.predict_flow(_batch(), generator=torch.Generator().manual_seed(1))
    task.perf_applied = perf.configure_inference(task, task.perf_config, device="cpu", bf16=True)
    flows = task.predict_flow(_batch(), generator=torch.Generator().manual_seed(1))  # no dtype clash
    assert [f.shape for f in flows] == [f.shape for f in ref] and all(f.dtype == torch.float32 for f in flows)


def test_bf16_task_checkpoint_loads_into_an_fp32_task():
    from icp.tasks.adaptation import AdaptationTask

    def task():
        torch.manual_seed(0)
        return AdaptationTask(tiny(resolution=RES, width=16, seed=7), train_appearance=False)

    trained = task()
    trained.configure_perf(precision="bf16-mixed", device="cpu")
    assert trained.appearance.net.conv_in.weight.dtype == torch.bfloat16  # a frozen task net
    ckpt = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(ckpt)
    fresh = task()
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    for name, p in fresh.named_parameters():
        q = dict(trained.named_parameters())[name]
        assert p.dtype == torch.float32 and torch.equal(p.to(q.dtype), q), name


class _Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {k: v[0] for k, v in _batch(1, seed=i).items()}


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_trainer_applies_perf_once_in_setup(tmp_path, precision):
    task = _stitching(train_unet="frozen")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, precision=precision, default_root_dir=tmp_path,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, DataLoader(_Pairs(), batch_size=2))
    applied = task.perf_applied
    assert (applied["bf16_frozen"] > 0) == (precision == "bf16-mixed") and applied["compiled"] == 0
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults.get("fused")  # CPU: not fused
    assert task.perf_applied is applied  # a second setup (validate) does not apply twice
    trainer.validate(task, DataLoader(_Pairs(), batch_size=2), verbose=False)
    assert task.perf_applied is applied
    images = _sample(task, _batch(), steps=2)  # still attached to the trainer: its precision
    assert torch.isfinite(images).all()


def test_benchmark_rows_run_tiny_on_cpu(tmp_path, repo_root, monkeypatch):
    """eval/bench_train.py builds its task rows from model.perf (off / the config's defaults)."""
    import json
    import sys

    monkeypatch.syspath_prepend(str(repo_root / "eval"))
    sys.modules.pop("bench_train", None)
    import bench_train

    variant = "d_task_defaults@channels_last=1;batched_cfg=0"
    ema = "b_task_defaults@ema_decay=0.9;foreach_ema=1"  # a task key and a switch
    bench_train.main(["--tiny", "--out", str(tmp_path), "--only",
                      f"b_task_off,b_task_defaults,d_task_defaults,{variant},{ema}",
                      "--profile", f"b_task_defaults,{variant}"])
    data = json.loads((tmp_path / "bench_train.json").read_text())
    assert not data["errors"], data["errors"]
    rows = {r["name"]: r for r in data["rows"]}
    named = "d_task_defaults+channels_last=1;batched_cfg=0"
    ema_row = rows.pop("b_task_defaults+ema_decay=0.9;foreach_ema=1")
    assert ema_row["settings"]["perf"] == {**perf.DEFAULTS, "foreach_ema": True}
    assert ema_row["settings"]["ema_decay"] == 0.9 and rows["b_task_defaults"]["settings"]["ema_decay"] == 0.0
    assert set(rows) == {"b_task_off", "b_task_defaults", "d_task_defaults", named}
    assert rows["b_task_off"]["settings"]["perf"] == perf.OFF
    assert rows["b_task_defaults"]["settings"]["perf"] == perf.DEFAULTS  # what experiments/*/sd15.yaml give
    assert rows[named]["settings"]["perf"] == {**perf.DEFAULTS, "channels_last": True, "batched_cfg": False}
    assert rows[named]["vs"] == "d_plain_controlnet" and list(data["profiles"]) == ["b_task_defaults", named]
    # A training row is profiled in its own Lightning loop, after its timed steps.
    assert data["profiles"]["b_task_defaults"].startswith("(the Lightning training step")
    assert "Optimizer.step#AdamW.step" in data["profiles"]["b_task_defaults"]
    # Sampling rows go through prepare_inference and are compared with one reference (fp32 on CPU).
    assert rows["d_task_defaults"]["settings"]["applied"]["inference"]
    assert rows[named]["images_vs_ref"]["rel_l1"] < 1e-4
    assert all(r["samples_per_s"] > 0 and r["gflop_per_sample"] > 0 for r in rows.values())


def test_flop_count_above_the_cap_is_fitted_exactly(repo_root, monkeypatch):
    """Rows above batch 64 count FLOPs from two smaller batches (an eager step at batch 112 did not
    fit an H200 beside the counter): the fit equals a direct count of a warm step."""
    monkeypatch.syspath_prepend(str(repo_root / "eval"))
    from icp.bench import common, tasks

    task = tasks.DenoiseTask(tiny(resolution=RES, width=32, seed=4), train_unet="full")
    task.backbone.codec = tasks.LatentCodec(task.backbone.latent_channels, task.backbone.downscale)
    batch = tasks.image_batch(6, task.backbone.latent_channels, (8, 8), torch.device("cpu"))
    calls = []

    def step_at(n):
        calls.append(n)
        return lambda: tasks.manual_step(task, tasks.batch_head(batch, n), torch.device("cpu"))

    fitted = common.count_flops_fitted(step_at, 6, cap=4)
    assert calls == [1, 2, 4]  # an uncounted warm call, then the two counted ones
    direct = common.count_flops(step_at(6))
    assert direct > 0 and fitted == pytest.approx(direct, rel=1e-9)
    assert common.count_flops_fitted(step_at, 4, cap=4) == common.count_flops(step_at(4))  # up to the cap: direct


def test_bench_costs_a_graph_neutral_variant_at_a_third_after_its_base(tmp_path, repo_root, monkeypatch):
    """The budget guard: a row that only adds graph-neutral keys (EMA, cuDNN search) to a row that
    already ran in the call reuses its compiled graphs, so it is costed at a third (two thirds
    after a row with inductor's CUDA graphs, whose code is dropped between rows); and a task key
    (ema_decay) reaches the task, not model.perf."""
    import sys

    monkeypatch.syspath_prepend(str(repo_root / "eval"))
    sys.modules.pop("bench_train", None)
    import bench_train
    from icp.bench import common

    args = bench_train.parse_args(["--cpu", "--out", str(tmp_path), "--budget", "100", "--plain-variants=",
                                   "--tag", "t", "--profile="])
    bench = bench_train.Bench(args)
    bench.defaults = perf.settings({"train": {}})  # no training override: variants say what trains
    whole = "compile_regional=0;compile=reduce-overhead"
    for base in ("compile_regional=0", whole):
        bench.results.append(common.Result(f"b_task_defaults_bs128+{base}", "b", 128, 1.0, 1.0, 0.0))
    ran, seen = [], {}

    def row():
        ran.append(bench.suffix)
        seen["perf"], seen["variant"] = bench.perf_node("defaults"), dict(bench.variant)

    bench.guarded("b_task_defaults_bs128@compile_regional=0;ema_decay=0.9999", row)  # 180 s / 3 fits 100 s
    bench.guarded(f"b_task_defaults_bs128@{whole};ema_decay=0.9999", row)  # CUDA graphs: 120 s
    bench.guarded("b_task_defaults_bs128@compile=max-autotune-no-cudagraphs;ema_decay=0.9999", row)  # no base
    assert ran == ["+compile_regional=0;ema_decay=0.9999"]
    assert "~120 s" in bench.errors[f"b_task_defaults_bs128@{whole};ema_decay=0.9999"]
    assert "skipped" in bench.errors["b_task_defaults_bs128@compile=max-autotune-no-cudagraphs;ema_decay=0.9999"]
    assert "ema_decay" not in seen["perf"] and seen["variant"]["ema_decay"] == "0.9999"
    assert seen["perf"]["compile"] == "default" and seen["perf"]["compile_regional"] is False
    assert bench.uses_cudagraphs(bench_train.parse_settings(whole.replace(";", ","))) and not bench.uses_cudagraphs()
    # With a train override in the defaults, a row's variant still decides what trains.
    bench.defaults = perf.settings({"train": {"compile": "reduce-overhead", "compile_regional": False}})
    bench.variant = {"compile_regional": True}
    row_perf = perf.training_settings(bench.perf_node("defaults"))
    assert row_perf["compile_regional"] is True and row_perf["compile"] == "reduce-overhead"
    bench.variant = {}


def test_every_bench_plan_names_rows_switches_and_profiles_the_bench_knows(repo_root, monkeypatch, tmp_path):
    """A typo in a plan would cost a GPU call (its row fails there, after minutes of compile); here
    it fails on CPU: each row is a known row, each variant sets real switches or task keys with
    values model.perf accepts, and each profiled row is one the plan runs."""
    import sys

    monkeypatch.syspath_prepend(str(repo_root / "eval"))
    sys.modules.pop("bench_train", None)
    import bench_train

    big = f"b_task_defaults_bs{bench_train.SIZES['full']['big_batch']}"
    for name, plan in bench_train.PLANS.items():
        ran = set()
        for row in plan.rows:
            base, _, spec = row.partition("@")
            assert base in bench_train.ROW_COST_S or bench_train.BATCH_ROW.fullmatch(base), (name, row)
            switches = bench_train.parse_settings(spec.replace(";", ","))
            perf.settings({k: v for k, v in switches.items() if k not in bench_train.TASK_KEYS}, where=row)
            ran |= {row, big if base == "b_task_defaults_big" else row}
        profiled = set(filter(None, plan.profile.split(",")))
        assert profiled <= ran, (name, profiled - ran)
    assert bench_train.parse_args(["--plan", "h200_b7"]).plan == "h200_b7"
    # b_task_defaults_big runs under its batch's name; a plan profiling it by either name gets it.
    bench = bench_train.Bench(bench_train.parse_args(["--cpu", "--plan", "h100b", "--out", str(tmp_path)]))
    assert bench.wants_profile(big)
    assert not bench.wants_profile("b_task_defaults")


def test_bench_keeps_the_timed_steps_when_the_profiled_ones_fail(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "eval"))
    from icp.bench import tasks

    task = tasks.DenoiseTask(tiny(resolution=RES, width=32, seed=4), train_unet="full")
    task.backbone.codec = tasks.LatentCodec(task.backbone.latent_channels, task.backbone.downscale)
    batch = tasks.image_batch(2, task.backbone.latent_channels, (8, 8), torch.device("cpu"))
    step = task.training_step

    def failing(batch, batch_idx):
        if batch_idx >= 3:  # warm-up 1 + 2 timed steps, then the profiled ones
            raise RuntimeError("profiler fault")
        return step(batch, batch_idx)

    monkeypatch.setattr(task, "training_step", failing)
    out = tasks.fit_and_time(task, batch, torch.device("cpu"), warmup=1, iters=2, precision="32-true",
                             profile_steps=2)
    assert out["iters"] == 2 and out["ms"] > 0
    assert out["profile"] == "profile failed: RuntimeError: profiler fault"
    with pytest.raises(RuntimeError, match="profiler fault"):  # a fault in the timed steps is not hidden
        tasks.fit_and_time(task, batch, torch.device("cpu"), warmup=4, iters=2, precision="32-true")


def test_profile_lists_data_movement_by_shape(repo_root, monkeypatch):
    """The bench's profile tells where copies come from by their shapes, most device time first."""
    import sys

    monkeypatch.syspath_prepend(str(repo_root / "eval"))
    from icp.bench.report import copies_by_shape

    def evt(key, us, count, shapes):
        return types.SimpleNamespace(key=key, self_device_time_total=us, count=count, input_shapes=shapes)

    events = [evt("aten::copy_", 4000.0, 6, [[64, 640, 64, 64], [64, 640, 64, 64]]),
              evt("aten::mm", 9000.0, 10, [[8, 8], [8, 8]]),  # not data movement
              evt("aten::cat", 0.0, 2, [[1]]),  # no device time: left out
              evt("aten::upsample_nearest2d", 6000.0, 2, [[64, 1280, 16, 16]])]
    prof = types.SimpleNamespace(key_averages=lambda group_by_input_shape=False: events)
    lines = copies_by_shape(prof, steps=2).strip().splitlines()
    assert lines[0].startswith("Data movement per call")
    assert "upsample_nearest2d" in lines[1] and "3.00 ms" in lines[1] and "[64, 1280, 16, 16]" in lines[1]
    assert "aten::copy_" in lines[2] and "2.00 ms" in lines[2] and "3.0x" in lines[2]
    assert len(lines) == 3 and sys.modules["bench.report"].COPY_OPS
    assert copies_by_shape(types.SimpleNamespace(key_averages=lambda **_: []), steps=1) == ""


def test_a_missed_target_says_where_time_went_and_what_was_tried(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "eval"))
    from icp.bench.report import targets

    def row(name, ratio, mfu):
        return {"name": name, "vs_baseline": ratio, "mfu": mfu, "samples_per_s": ratio * 100}

    table = [row("a_plain", float("nan"), 0.30), row("b_task_defaults_bs64", 1.39, 0.42),
             row("b_task_defaults_bs64+compile_regional=0", 1.41, 0.43), row("c_stitching_defaults", 1.7, 0.404)]
    bench = types.SimpleNamespace(profiles={"b_task_defaults_bs64": "..."}, loader={})
    lines = targets(bench, table)
    assert lines[0].startswith("- MISS (b)") and "compile_regional=0 1.41x" in lines[0]
    assert lines[1] == "  - where the time goes: 'Profile: b_task_defaults_bs64' below"
    assert lines[2] == "  - also tried in this run: b_task_defaults_bs64 1.39x"
    assert "docs/decisions/performance.md" in lines[3]
    assert lines[4].startswith("- PASS (c) c_stitching_defaults") and len(lines) == 5  # a pass adds nothing


def test_kernel_busy_time_leaves_out_annotated_ranges(repo_root, monkeypatch):
    from torch.autograd import DeviceType

    monkeypatch.syspath_prepend(str(repo_root / "eval"))
    from icp.bench.report import kernel_time_us

    def evt(us, device=DeviceType.CUDA, annotation=False):
        span = types.SimpleNamespace(elapsed_us=lambda: us)
        return types.SimpleNamespace(device_type=device, is_user_annotation=annotation, time_range=span)

    # A compiled graph's annotated span over its two kernels, and a host-side op.
    events = [evt(100.0, annotation=True), evt(60.0), evt(40.0), evt(500.0, device=DeviceType.CPU)]
    assert kernel_time_us(events) == 100.0


def test_perf_nodes_of_the_configs_are_the_defaults(repo_root):
    from icp.core import config as cfglib

    for stage in ("stitching", "adaptation"):
        cfg = cfglib.load(repo_root / "experiments" / stage / "tiny.yaml")
        assert perf.settings(dict(cfg.model.perf)) == perf.DEFAULTS, stage
        assert list(cfg.model.perf) and set(cfg.model.perf) == set(perf.DEFAULTS), stage  # every switch listed
    # And the module's table names every switch.
    assert all(f"\n{key} " in perf.__doc__ for key in perf.DEFAULTS)


def test_ddp_wraps_a_task_with_bf16_frozen_parts(tmp_path):
    """DDP (gloo, one process) over mixed fp32-trained / bf16-frozen weights: sync, step, grads."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    class Step(torch.nn.Module):  # DDP wraps forward(); the task's step is losses()
        def __init__(self, task):
            super().__init__()
            self.task = task

        def forward(self, batch, generator):
            return self.task.losses(batch, generator=generator)["loss"]

    task = _stitching(train_unet="frozen")
    task.configure_perf(precision="bf16-mixed", device="cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(Step(task))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ddp(_batch(), torch.Generator().manual_seed(0))
        loss.backward()
    finally:
        dist.destroy_process_group()
    assert task.backbone.unet.conv_in.weight.dtype == torch.bfloat16
    trained = task.trainable_parameters()
    assert trained and all(p.grad is not None and p.dtype == torch.float32 for p in trained)
    assert all(p.grad is None for p in task.parameters() if not p.requires_grad)
