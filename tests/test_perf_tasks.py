"""The task wiring of ``model.perf``: sampling with the switches off is the old loop and with them
the same images, evaluation's bf16 weights and kept sampling graph, the trainer applying the
switches once, the EMA, accumulation without CUDA graphs, DDP."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from icp import perf
from icp.data import keys as K
from icp.models.backbone import tiny
from tests.perf_helpers import RES, _batch, _norm_rel, _old_sample, _Pairs, _rel, _sample, _stitching
from tests.perf_helpers import _threads  # noqa: F401 (autouse: one thread, the SDPA kernel reset)


def test_graphs_are_plain_calls_off_cuda():
    fn = torch.nn.Linear(3, 3)
    step = perf.GraphedStep(fn)
    x = torch.randn(2, 3)
    for _ in range(4):
        assert torch.equal(step(x), fn(x))
    assert not step.captured


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


def test_trainer_with_accumulation_trains_without_cuda_graphs(tmp_path, caplog):
    task = _stitching({"compile": "reduce-overhead", "compile_regional": False}, train_unet="frozen")
    assert perf.uses_cudagraphs(task.perf_config)
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
                        default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    with caplog.at_level("WARNING", logger="icp.tasks.base"):
        trainer.fit(task, DataLoader(_Pairs(), batch_size=2))
    assert task.perf_config["compile"] == "default" and not perf.uses_cudagraphs(task.perf_config)
    assert "accumulated over 2 micro-batches" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's CUDA graphs exist on CUDA only")
def test_whole_nets_under_cuda_graphs_train_validate_sample_and_accumulate_on_cuda(tmp_path):
    """Whole nets under inductor's CUDA graphs (compile: reduce-overhead, compile_regional: false:
    the removed training override's setting, still a valid choice) through a real Trainer, on both
    tasks: a sanity validation before the first step and validation after an epoch (no-grad chains
    of compiled nets: control nets -> UNet), steps with a finite, changing loss, samples and flows
    while attached to the trainer; and accumulation, which must train without the graphs and sum
    the same gradient as an eager run."""
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
    whole = {"compile": "reduce-overhead", "compile_regional": False}
    adaptation = AdaptationTask(tiny(resolution=RES, width=32, seed=6), perf=whole)
    for task in (_stitching(whole, train_unet="frozen"), adaptation):
        losses.clear()
        seen.clear()
        task, trainer = fit(task)
        assert perf.uses_cudagraphs(task.perf_config) and task.perf_applied["compiled"] >= 2
        assert len(losses) == 3 and all(map(torch.isfinite, map(torch.tensor, losses))) and losses[0] != losses[1]
        assert torch.isfinite(trainer.callback_metrics["val/loss"])
        for images in seen["images"]:
            assert images.shape == (2, 3, RES, RES) and torch.isfinite(images).all()
        if isinstance(task, AdaptationTask):
            flows = seen["flows"]
            assert all(torch.isfinite(f).all() for f in flows) and all(map(torch.equal, flows, seen["kept"]))
        torch._dynamo.reset()
    guarded, _ = fit(_stitching(whole, train_unet="frozen"), accumulate=2, steps=1, validate=False)
    assert not perf.uses_cudagraphs(guarded.perf_config)
    torch._dynamo.reset()
    fit(_stitching({"compile": "none"}, train_unet="frozen"), accumulate=2, steps=1, validate=False)
    # The summed gradient of both micro-batches (a kept-and-overwritten first one would be off by
    # far more than bf16 rounding: pytorch#169545 saw a quarter of it).
    assert len(grads) == 2 and (grads[0] - grads[1]).norm() < 0.05 * grads[1].norm()


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
