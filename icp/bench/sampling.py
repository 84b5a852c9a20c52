"""(d) rows of eval/bench_train.py: sampling, 30 DDIM steps with CFG. The plain diffusers loops
(``d_plain_unet``, ``d_plain_controlnet`` = the same models as StitchingTask.sample) against
``task.sample`` as evaluation calls it (``prepare_inference``, no trainer), with the images of every
mode compared to one eager reference and the kept sampling graph checked on another batch.
A mixin of :class:`icp.bench.train.Bench` (its device, sizes, recording and profiling)."""

from __future__ import annotations

import time

import torch

from icp.bench import common, plain, tasks
from icp.data import keys as K


class SamplingRows:
    def sample_case(self, name, fn, batch, settings, flops, warmup: int, iters: int, **extra) -> None:
        common.reset_memory(self.device)
        timing = common.time_steps(fn, self.device, warmup, iters)
        extra.setdefault("first_steps_s", timing["warmup_s"] if warmup else None)
        self.record(name, "d", batch, timing, flops, settings, steps=self.size["steps"], **extra)
        self.maybe_profile(name, fn)

    def row_d_plain_unet(self) -> None:
        n, b = self.latent, self.size["sample_batch"]
        sampler = plain.PlainSampler(self.backbone(), b, (n, n), self.device, steps=self.size["steps"], guidance=7.5)
        self.sample_case("d_plain_unet", sampler, b, {"weights": "fp32", "autocast": "bf16"},
                         common.count_flops(sampler), 1, self.size["sample_iters"])

    def row_d_plain_controlnet(self) -> None:
        from diffusers import ControlNetModel

        n, b = self.latent, self.size["sample_batch"]
        parts = self.backbone()
        net = ControlNetModel.from_unet(parts.unet, conditioning_channels=parts.unet.config.in_channels,
                                        conditioning_embedding_out_channels=(64,))
        sampler = plain.PlainSampler(parts, b, (n, n), self.device, steps=self.size["steps"], guidance=7.5,
                                     controlnet=net)
        self.sample_case("d_plain_controlnet", sampler, b, {"weights": "fp32", "autocast": "bf16"},
                         common.count_flops(sampler), 1, self.size["sample_iters"])

    def task_sample_row(self, mode: str) -> None:
        """``task.sample`` as evaluation calls it: icp.tasks.loading.load_task builds the task, moves
        it and calls ``prepare_inference`` (bf16 weights, compile; no trainer, no setup())."""
        from icp.tasks.stitching import StitchingTask

        b, steps = self.size["sample_batch"], self.size["steps"]
        node = self.perf_node(mode)  # a row's ``@key=value`` (e.g. cuda_graph_sampling=0) is in it
        task = StitchingTask(self.backbone(), perf=node).to(self.device).eval()
        batch = tasks.image_batch(b, 3, (self.size["res"],) * 2, self.device)
        # Fixed noise: every mode's images can be compared with the first task row's.
        fn = lambda: task.sample(batch, num_steps=steps, guidance_scale=7.5,  # noqa: E731
                                 generator=torch.Generator(self.device).manual_seed(0))
        counted_here = self._d_flops is None
        if counted_here:
            # Same work in every mode (batched CFG runs the same UNet FLOPs); counted eagerly before
            # anything is compiled or graphed (a graph replay is invisible to the counter). On the
            # fp32 weights: the count does not depend on precision.
            graphs = task.perf_config["cuda_graph_sampling"]
            task.perf_config["cuda_graph_sampling"] = False
            self._d_flops, images = common.counted_call(fn)
            self._d_ref = (f"d_task_{mode} before prepare_inference, eager", images)
            task.perf_config["cuda_graph_sampling"] = graphs
        start = time.perf_counter()
        applied = task.prepare_inference(self.device)
        prepare_s = time.perf_counter() - start
        # The fp32 "off" loop is slow (~12 s per call on an H100): one timed call, and no extra
        # warm-up when the FLOP count already ran it. Others: one warm-up call (compilation).
        warmup = 0 if (mode == "off" and counted_here) else 1
        iters = 1 if mode == "off" else self.size["sample_iters"]
        self.sample_case(f"d_task_{mode}", fn, b, {"perf": node, "applied": applied}, self._d_flops, warmup, iters,
                         prepare_s=prepare_s)
        # Same images as the reference, up to precision? (mean |difference| / mean |reference|)
        ref_name, ref = self._d_ref
        images = fn()
        self.results[-1].extra["images_vs_ref"] = {"ref": ref_name, "rel_l1": common.rel_l1(images, ref)}
        if node["cuda_graph_sampling"]:
            self.check_kept_graph(task, batch, steps)
        self.save()

    def check_kept_graph(self, task, batch: dict, steps: int) -> None:
        """The kept graphed step on another batch vs the same task without graphs: the new
        batch's condition and prompt must reach the replayed graph (inputs, not closed-over
        tensors). The zero-initialised projections are randomised first (in place: the kept graph
        reads the same memory), else no condition would change the images. Batch B also has
        another prompt: with random weights the condition alone moves the images less than bf16
        noise does (H200: 0.0093 vs 0.0094 between graphed and eager B; CPU fp32 at 256 px, 4
        steps: 0.0007 for the condition, 0.039 with another prompt), the text states far more."""
        with torch.no_grad():
            for p in [*task.appearance.proj_down.parameters(), *task.appearance.proj_mid.parameters()]:
                # std 1: at 0.2 (first H200 run) the batches differed by 0.010, the size of bf16 noise
                p.normal_(0, 1.0, generator=torch.Generator(p.device).manual_seed(p.numel()))

        def run(b, graphs):
            task.perf_config["cuda_graph_sampling"] = graphs
            return task.sample(b, num_steps=steps, guidance_scale=7.5,
                               generator=torch.Generator(self.device).manual_seed(0))

        n = batch[K.PROFILE].shape[0]
        other = {**batch, K.PROFILE: batch[K.PROFILE].flip(0), K.TARGET_MASKED: batch[K.TARGET_MASKED].flip(0),
                 K.PROMPT: ["an old man, studio light"] * n}
        graphed, eager, first = run(other, True), run(other, False), run(batch, False)
        task.perf_config["cuda_graph_sampling"] = True
        extra = self.results[-1].extra
        extra["graph_other_batch_vs_eager"] = common.rel_l1(graphed, eager)
        extra["other_batch_vs_first"] = common.rel_l1(eager, first)
        extra["graph_other_batch_vs_first"] = common.rel_l1(graphed, first)  # ~ the line above if stale

    def row_d_task_off(self) -> None:
        self.task_sample_row("off")

    def row_d_task_defaults(self) -> None:
        self.task_sample_row("defaults")
