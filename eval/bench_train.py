"""GPU training / sampling / loader benchmark (issue 9), one run, one table.

    python eval/bench_train.py                      # full SD1.5 sizes (GPU)
    python eval/bench_train.py --tiny --out /tmp/b  # seconds on CPU: every code path, tiny sizes

Sections (``--only a,b,...``): peak (bf16 matmul rate, the MFU denominator); a (plain diffusers
train step = baseline, + the same loop with single switches); b (the same step through icp's
task + lightning.Trainer, perf settings off / on); c (full Lighting-Aware Stitching step at 512
px, and View-Consistent Adaptation when that task exists); d (sampling: plain diffusers loops vs
icp's task.sample, and task.sample with CUDA graphs); vae (encode at 512 px); e (shard loader
samples/s with this machine's cores vs what c consumes). Writes bench_train.{json,md} to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import common, plain, tasks  # noqa: E402
from bench.report import write_report  # noqa: E402

from icp import perf  # noqa: E402
from icp.models import backbone as bb  # noqa: E402

SIZES = {
    "full": dict(res=512, batch=32, canvas_batch=16, task_batch=16, sample_batch=8, steps=30, vae_batch=32,
                 warmup=3, iters=10, sample_iters=2, loader_ids=16, loader_views=4, loader_batch=16,
                 loader_batches=12),
    "tiny": dict(res=32, batch=2, canvas_batch=2, task_batch=2, sample_batch=2, steps=3, vae_batch=2,
                 warmup=1, iters=2, sample_iters=1, loader_ids=2, loader_views=3, loader_batch=2,
                 loader_batches=2),
}
# The project's performance defaults (what "settings on" means); see docs/decisions/performance.md.
DEFAULT_ON = "bf16_frozen=1,memo_text=1,compile=default,regional=1,sdpa=auto,channels_last=0"


def parse_settings(spec: str) -> dict:
    out = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        out[key] = {"1": True, "0": False}.get(value, None if value == "none" else value)
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.size = dict(SIZES["tiny" if args.tiny else "full"])
        if args.batch:
            self.size["batch"] = args.batch
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.on = parse_settings(args.on)
        self.task_modes = [m == "on" for m in args.task_modes.split(",") if m]
        self.results: list[common.Result] = []
        self.peak = float("nan")
        self.loader: dict = {}
        self.profiles: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.notes: list[str] = []
        self.tag = f"_{args.tag}" if args.tag else ""
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.time()

    # -------------------------------------------------------------------------------- building
    def backbone(self, latent_codec: bool = False) -> bb.Backbone:
        """Random-weight parts, initialised directly on the device (seconds, not minutes)."""
        torch.manual_seed(0)
        with torch.device(self.device):
            if self.tiny:
                parts = bb.tiny(resolution=self.size["res"], width=32, codec_factor=4)
            else:
                parts = bb.sd15_architecture(random=True)
        if latent_codec:
            parts.codec = tasks.LatentCodec(parts.unet.config.in_channels, parts.downscale)
        return parts

    @property
    def latent(self) -> int:
        return self.size["res"] // (4 if self.tiny else 8)

    # -------------------------------------------------------------------------------- recording
    def record(self, name, section, batch, timing, flops, settings=None, **extra) -> common.Result:
        result = common.Result(name, section, batch, timing["ms"], flops, common.peak_memory_gib(self.device),
                               settings or {}, {"ms_min": timing["ms_min"], "ms_max": timing["ms_max"], **extra})
        self.results.append(result)
        row = result.row(self.peak, None)
        print(f"[{time.time() - self.started:6.0f}s] {name:28s} {row['samples_per_s']:9.2f} samples/s "
              f"{row['tflops']:7.1f} TFLOP/s  mfu {row['mfu']:.2f}  {row['peak_gib']:.1f} GiB", flush=True)
        self.save()
        return result

    def save(self) -> None:
        write_report(self.out, self)

    def guarded(self, name: str, fn) -> None:
        if self.args.deadline and time.time() - self.started > self.args.deadline:
            self.errors[name] = "skipped: --deadline reached"
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 -- one failed variant must not lose the others
            self.errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            traceback.print_exc()
        finally:
            tasks.free()
            self.save()

    def maybe_profile(self, name: str, step) -> None:
        if name in self.args.profile.split(","):
            from bench.report import profile_table

            self.profiles[name] = profile_table(step, self.device)

    # -------------------------------------------------------------------------------- sections
    def sec_peak(self) -> None:
        self.peak = common.matmul_peak_tflops(self.device, size=1024 if self.tiny else 8192)
        print(f"bf16 matmul peak: {self.peak:.1f} TFLOP/s", flush=True)

    def plain_train(self, name, batch, hw, switches: dict) -> None:
        parts = self.backbone()
        step = plain.PlainTrainStep(parts, batch, hw, self.device)
        # Count FLOPs before compiling: dynamo refuses to trace under the counter's dispatch mode
        # and then leaves the code eager for good (seen on the H100: compile measured 1.00x).
        flops = common.count_flops(step)
        if switches.get("channels_last"):
            perf.channels_last(parts.unet)
            step.latents = step.latents.contiguous(memory_format=torch.channels_last)
        perf.set_sdpa_backend(switches.get("sdpa", "auto"))
        perf.compile_module(parts.unet, switches.get("compile"), regional=switches.get("regional", True))
        common.reset_memory(self.device)
        timing = common.time_steps(step, self.device, self.size["warmup"], self.size["iters"])
        self.record(name, "a", batch, timing, flops, switches)
        self.maybe_profile(name, step)
        perf.set_sdpa_backend("auto")

    def sec_a(self) -> None:
        n, b = self.latent, self.size["batch"]
        self.guarded("a_plain", lambda: self.plain_train("a_plain", b, (n, n), {}))
        self.guarded("a_plain_canvas", lambda: self.plain_train("a_plain_canvas", self.size["canvas_batch"],
                                                                (n, 2 * n), {}))
        for spec in filter(None, self.args.plain_variants.split(";")):
            name = "a_" + spec.replace("=", "").replace(",", "_")
            self.guarded(name, lambda spec=spec, name=name: self.plain_train(name, b, (n, n), parse_settings(spec)))

    def sec_late(self) -> None:
        """Slow-to-build plain-loop variants (torch.compile), last so they cannot starve the rest."""
        n, b = self.latent, self.size["batch"]
        for spec in filter(None, self.args.late_variants.split(";")):
            name = "a_" + spec.replace("=", "").replace(",", "_")
            self.guarded(name, lambda spec=spec, name=name: self.plain_train(name, b, (n, n), parse_settings(spec)))

    def task_settings(self, task, on: bool) -> dict:
        if not on:
            return {}
        s = self.on
        applied = perf.configure_task(task, bf16_frozen_weights=bool(s.get("bf16_frozen", True)),
                                      channels_last_layout=bool(s.get("channels_last", False)),
                                      compile=s.get("compile"), compile_regional=bool(s.get("regional", True)),
                                      sdpa=s.get("sdpa") or "auto", memo_text=bool(s.get("memo_text", True)),
                                      precision="bf16-mixed")
        return {**s, "applied": applied}

    def fit_task(self, name, section, task, batch, n_samples, on: bool) -> None:
        flops = common.count_flops(lambda: tasks.manual_step(task, batch, self.device))  # eager, see plain_train
        settings = self.task_settings(task, on)
        common.reset_memory(self.device)
        timing = tasks.fit_and_time(task, batch, self.device, self.size["warmup"], self.size["iters"])
        self.record(name, section, n_samples, timing, flops, settings)
        if self.args.profile and name in self.args.profile.split(","):
            self.maybe_profile(name, lambda: tasks.manual_step(task, batch, self.device))
        perf.set_sdpa_backend("auto")

    def sec_b(self) -> None:
        from bench.tasks import DenoiseTask

        n, b = self.latent, int(self.size["batch"])
        for on in self.task_modes:
            name = "b_task_" + ("on" if on else "off")

            def run(on=on, name=name):
                parts = self.backbone(latent_codec=True)
                task = DenoiseTask(parts, optimizer=tasks.fused_adamw(self.device), train_unet="full")
                batch = tasks.image_batch(b, parts.unet.config.in_channels, (n, n), self.device)
                self.fit_task(name, "b", task, batch, b, on)

            self.guarded(name, run)
        scale = float(self.on.get("batch_scale") or 1)
        if scale != 1:
            bigger = int(b * scale)

            def run_big():
                parts = self.backbone(latent_codec=True)
                task = DenoiseTask(parts, optimizer=tasks.fused_adamw(self.device), train_unet="full")
                batch = tasks.image_batch(bigger, parts.unet.config.in_channels, (n, n), self.device)
                self.fit_task(f"b_task_on_bs{bigger}", "b", task, batch, bigger, True)

            self.guarded("b_task_on_big", run_big)

    def sec_c(self) -> None:
        from icp.tasks.stitching import StitchingTask

        r, b = self.size["res"], self.size["task_batch"]
        for on in self.task_modes:
            name = "c_stitching_" + ("on" if on else "off")

            def run(on=on, name=name):
                task = StitchingTask(self.backbone(), optimizer=tasks.fused_adamw(self.device), train_unet="frozen")
                self.fit_task(name, "c", task, tasks.image_batch(b, 3, (r, r), self.device), b, on)

            self.guarded(name, run)
        try:
            from icp.tasks.adaptation import AdaptationTask
        except ImportError as err:
            self.errors["c_adaptation"] = f"not run: icp.tasks.adaptation is not available yet ({err})"
            return
        for on in self.task_modes:
            name = "c_adaptation_" + ("on" if on else "off")

            def run_ad(on=on, name=name):
                task = AdaptationTask(self.backbone(), optimizer=tasks.fused_adamw(self.device), train_unet="frozen")
                self.fit_task(name, "c", task, tasks.image_batch(b, 3, (r, r), self.device), b, on)

            self.guarded(name, run_ad)

    def sample_case(self, name, fn, batch, settings, flops=None) -> None:
        common.reset_memory(self.device)
        # Task rows pass FLOPs counted eagerly before any switch (graph replays and compiled code
        # are invisible to / broken by the counter).
        flops = common.count_flops(fn) if flops is None else flops
        timing = common.time_steps(fn, self.device, 1, self.size["sample_iters"])
        self.record(name, "d", batch, timing, flops, settings, steps=self.size["steps"])
        self.maybe_profile(name, fn)

    def sec_d(self) -> None:
        from diffusers import ControlNetModel

        from bench.sampling import graphed_sample
        from icp.tasks.stitching import StitchingTask

        n, b, steps, g = self.latent, self.size["sample_batch"], self.size["steps"], 7.5

        def plain_unet():
            sampler = plain.PlainSampler(self.backbone(), b, (n, n), self.device, steps=steps, guidance=g)
            self.sample_case("d_plain_unet", sampler, b, {"weights": "fp32", "autocast": "bf16"})

        def plain_control():
            parts = self.backbone()
            net = ControlNetModel.from_unet(parts.unet, conditioning_channels=parts.unet.config.in_channels,
                                            conditioning_embedding_out_channels=(64,))
            sampler = plain.PlainSampler(parts, b, (n, n), self.device, steps=steps, guidance=g, controlnet=net)
            self.sample_case("d_plain_controlnet", sampler, b, {"weights": "fp32", "autocast": "bf16"})

        def task_sample(mode: str):
            task = StitchingTask(self.backbone()).to(self.device)
            batch = tasks.image_batch(b, 3, (self.size["res"],) * 2, self.device)
            settings = {"mode": mode}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=mode != "as_is"):
                flops = common.count_flops(lambda: task.sample(batch, num_steps=steps, guidance_scale=g))
            if mode != "as_is":
                task.backbone.unet.requires_grad_(False)
                task.appearance.requires_grad_(False)  # sampling trains nothing: every part is frozen
                settings.update(self.task_settings(task, True))
            ac = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=mode != "as_is")

            def plain_fn():
                with ac:
                    return task.sample(batch, num_steps=steps, guidance_scale=g)

            if mode == "graphed":
                fn = lambda: graphed_sample(task, batch, steps, g)  # noqa: E731
                self.sample_case(f"d_task_{mode}", fn, b, settings, flops=flops)
            else:
                self.sample_case(f"d_task_{mode}", plain_fn, b, settings, flops=flops)

        self.guarded("d_plain_unet", plain_unet)
        self.guarded("d_plain_controlnet", plain_control)
        for mode in self.args.sample_modes.split(","):
            self.guarded(f"d_task_{mode}", lambda mode=mode: task_sample(mode))

    def sec_vae(self) -> None:
        r, b = self.size["res"], self.size["vae_batch"]
        for name, dtype, cl in (("vae_fp32_autocast", torch.float32, False), ("vae_bf16", torch.bfloat16, False),
                                ("vae_bf16_cl", torch.bfloat16, True)):
            def run(name=name, dtype=dtype, cl=cl):
                enc = plain.PlainVaeEncode(self.backbone(), b, r, self.device, weights_dtype=dtype, channels_last=cl)
                common.reset_memory(self.device)
                flops = common.count_flops(enc)
                timing = common.time_steps(enc, self.device, self.size["warmup"], self.size["iters"])
                self.record(name, "vae", b, timing, flops, {"weights": str(dtype), "channels_last": cl})
                self.maybe_profile(name, enc)

            self.guarded(name, run)

    def sec_e(self) -> None:
        from bench import loader

        cores = common._cpu_count()
        workers = sorted({max(1, cores - 2), max(1, cores // 4)}) if not self.tiny else [0, 1]
        self.loader = loader.run(self.size["loader_ids"], self.size["loader_views"], self.size["res"],
                                 self.size["loader_batch"], workers, self.size["loader_batches"],
                                 render_workers=max(1, cores))
        self.loader["cores"] = cores
        print("loader:", json.dumps(self.loader), flush=True)

    def run(self) -> None:
        self.env = common.environment(self.device)
        print(json.dumps(self.env), flush=True)
        order = ["a", "b", "c", "d", "vae", "e", "late"]
        if self.args.only:  # the given order: run what matters most first under a --deadline
            order = [s for s in self.args.only.split(",") if s in order]
        for section in ["peak", *order]:
            self.guarded(section, getattr(self, f"sec_{section}"))
        self.save()
        print((self.out / f"bench_train{self.tag}.md").read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke run)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even where a GPU exists")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--only", default="", help="comma list of sections, run in this order: a,b,c,d,vae,e,late")
    p.add_argument("--batch", type=int, default=0, help="override the (a)/(b) batch size")
    p.add_argument("--on", default=DEFAULT_ON, help="the 'settings on' of b/c/d, key=value list")
    p.add_argument("--plain-variants", default="channels_last=1;sdpa=flash;sdpa=cudnn;sdpa=efficient",
                   help="';'-separated switch sets timed on the plain loop (a)")
    p.add_argument("--late-variants", default="compile=default",
                   help="';'-separated switch sets timed last on the plain loop (slow to build)")
    p.add_argument("--task-modes", default="off,on", help="b/c variants: settings off and/or on")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--sample-modes", default="as_is,autocast,on,graphed")
    p.add_argument("--profile", default="", help="comma list of row names to profile (torch.profiler table)")
    p.add_argument("--deadline", type=float, default=0, help="skip sections starting after this many seconds")
    args = p.parse_args(argv)
    if args.tiny:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    Bench(args).run()


if __name__ == "__main__":
    main()
