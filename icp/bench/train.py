"""GPU training / sampling / loader benchmark (issue 9): one run, one table.

    python eval/bench_train.py --plan h100 --budget 500 --out DIR   # one <= 9-minute H100 call
    python eval/bench_train.py --plan h100b --budget 500 --out DIR  # the rows call 1 had no time for
    python eval/bench_train.py --tiny --out /tmp/bench_tiny         # every code path, tiny, CPU, ~1 min

Rows (``--only`` takes row names or section letters, run in the given order; ``ROW@key=value``
runs a "defaults" row with some switches changed, e.g. ``c_stitching_defaults@channels_last=1``):

- peak: bf16 matmul rate, the MFU denominator;
- a: the plain diffusers train step (the baseline, ``a_plain``), its 64x128 canvas version, and
  the same loop with single switches (``a_variants``: channels_last, SDPA kernels; ``a_compile``);
- b: the same denoising step through icp's task and ``lightning.Trainer``: ``b_task_off``
  (``model.perf`` all off: the framework alone), ``b_task_defaults`` (the project's defaults, read
  from experiments/stitching/sd15.yaml's ``model.perf``) and ``b_task_defaults_big`` (defaults at a
  larger batch, from the memory they save);
- c: the full Lighting-Aware Stitching / View-Consistent Adaptation steps at 512 px, off / defaults;
- d: sampling (30 DDIM steps, CFG): plain diffusers loops (``d_plain_unet``, ``d_plain_controlnet``
  = the same models as StitchingTask.sample) vs ``task.sample`` as evaluation calls it (no
  trainer) with perf off / defaults / defaults without the CUDA graph;
- vae: VAE encode at 512 px; e: the shard loader's samples/s with this machine's cores;
- attn: the attention kernels alone at the steps' shapes (SDPA kernels, heads zero-padded to 64,
  the VAE's 512-wide head as matmul + softmax): seconds per candidate instead of a compiled step.

``b_task_defaults_bsN`` runs the (b) defaults row at batch N (``b_task_defaults_big`` = the
``--big-batch``, 72: the fastest H100 batch under the training override, round 7).

Each task row is built the way a config builds it: ``perf=<the model.perf node>`` and an AdamW
``_partial_`` optimizer ("off" rows set ``fused: true`` in it, as (a) does, so that they do the
same work as the baseline; "defaults" rows leave it to ``perf.fused_optimizer``). FLOPs are counted
eagerly before anything is compiled or graphed. ``--budget`` skips a row whose estimated time
(compile included, see ROW_COST_S) no longer fits, so a run under a hard time limit keeps every
finished row; the table is rewritten after each row. Writes bench_train[_TAG].{json,md} to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from icp.bench import common, plain, tasks  # noqa: E402
from icp.bench.report import write_report  # noqa: E402

from icp import perf  # noqa: E402
from icp.core.paths import REPO, RESULTS  # noqa: E402
from icp.data import keys as K  # noqa: E402
from icp.models import backbone as bb  # noqa: E402

ROOT = REPO
SIZES = {
    "full": dict(res=512, batch=32, big_batch=72, canvas_batch=16, task_batch=32, sample_batch=8, steps=30,
                 vae_batch=32, warmup=3, iters=10, sample_iters=2, loader_ids=16, loader_views=4, loader_batch=16,
                 loader_batches=12),
    "tiny": dict(res=32, batch=2, big_batch=3, canvas_batch=2, task_batch=2, sample_batch=2, steps=3, vae_batch=2,
                 warmup=1, iters=2, sample_iters=1, loader_ids=2, loader_views=3, loader_batch=2,
                 loader_batches=2),
}
# Estimated seconds per row on an H100/H200 with 16 cores (build + warm-up + timing; compile rows
# include torch.compile of their block shapes: 2-4 min for the UNet's fwd+bwd, measured on the
# H200: c_stitching_defaults 185-225 s of warm-up, b_task_defaults_bs48 120-138 s, d 86-114 s).
# c_adaptation_defaults after c_stitching_defaults reuses the frozen-UNet, VAE and trainable
# control-net graphs (same shapes), so it compiles far less (35 s of warm-up).
ROW_COST_S = {
    "peak": 10, "a_plain": 25, "a_plain_canvas": 25, "a_variants": 110, "a_compile": 240,
    "b_task_off": 30, "b_task_defaults": 200, "b_task_defaults_big": 180,
    "c_stitching_off": 35, "c_stitching_defaults": 270, "c_adaptation_off": 45, "c_adaptation_defaults": 120,
    "d_plain_unet": 20, "d_plain_controlnet": 25, "d_task_off": 40, "d_task_defaults": 150,
    "d_task_defaults_nograph": 25, "d_task_defaults_nocompile": 30, "vae": 45, "e": 100, "attn": 60,
}
# Switches that leave the compiled graphs as they are: a variant of only these reuses the graphs of
# its base row (inductor's cache), so it costs a fraction of the base row.
GRAPH_NEUTRAL = {"cudnn_benchmark", "foreach_ema", "ema_decay", "lagged_progress_loss"}
# Row keys that are task arguments, not model.perf switches: ``ema_decay`` (what sd15.yaml trains
# with, 0.9999; the (a) loop and the plain rows have no EMA).
TASK_KEYS = {"ema_decay"}
BATCH_ROW = re.compile(r"b_task_defaults_bs(\d+)")  # (b) defaults at batch N, costed like _big
SECTIONS = {
    "peak": ["peak"], "a": ["a_plain", "a_plain_canvas", "a_variants"], "late": ["a_compile"],
    "b": ["b_task_off", "b_task_defaults", "b_task_defaults_big"],
    "c": ["c_stitching_off", "c_stitching_defaults", "c_adaptation_off", "c_adaptation_defaults"],
    "d": ["d_plain_unet", "d_plain_controlnet", "d_task_off", "d_task_defaults_nocompile", "d_task_defaults_nograph",
          "d_task_defaults"],
    "vae": ["vae"], "e": ["e"], "attn": ["attn"],
}


class Plan(NamedTuple):
    """An ordered row list for one GPU call and the rows profiled in it (torch.profiler summaries:
    where the time goes, for the rows with targets)."""
    rows: list[str]
    profile: str = ""


# The training-only override measured since round 5 (model.perf.train): the whole UNet compiled,
# under inductor's CUDA graphs.
TRAIN = "compile_regional=0;compile=reduce-overhead"
B64, B96, B128 = "b_task_defaults_bs64", "b_task_defaults_bs96", "b_task_defaults_bs128"
STITCH, ADAPT = "c_stitching_defaults", "c_adaptation_defaults"
LAGGED = "lagged_progress_loss=1"
# Ordered by what each call must not miss; rows that no longer fit the budget are skipped.
PLANS = {
    # Call 1: baseline, framework overhead, sampling target, stitching with compile (new), then
    # adaptation with compile reusing stitching's graphs.
    "h100": Plan(["peak", "a_plain", "b_task_off", "d_plain_controlnet", "d_task_defaults", "d_task_defaults_nograph",
                  "c_stitching_off", STITCH, "c_adaptation_off", ADAPT, "d_task_off"],
                 profile=f"b_task_off,{STITCH}"),
    # Call 2: (b) with compile at the larger batch and at the baseline's batch, loader.
    "h100b": Plan(["peak", "a_plain", "b_task_defaults_big", "b_task_defaults", "e"], profile="b_task_defaults_big"),
    # Round 2 on the H200 (eval/results/bench_train_h200{e,f}): attention kernels alone, (c) with
    # the wide-head matmul and without it; (d) with fused QKV, (b) at batch 64.
    "h200_train": Plan(["peak", "a_plain", "attn", STITCH, ADAPT, f"{STITCH}@wide_heads_matmul=0"],
                       profile=f"{STITCH},{ADAPT}"),
    "h200_sample": Plan(["peak", "a_plain", "d_plain_controlnet", "d_task_defaults", "d_task_defaults@fuse_qkv=1",
                         B64], profile=f"d_task_defaults,d_task_defaults@fuse_qkv=1,{B64}"),
    # Round 3: same-run ratios for (c) with the glue regions; (d) with the stronger kept-graph check
    # and the rows left to try (max-autotune kernels on the evaluation path last: long autotuning).
    "h200_c": Plan(["peak", "a_plain", "c_stitching_off", STITCH, "c_adaptation_off", ADAPT], profile=ADAPT),
    "h200_d": Plan(["peak", "d_plain_controlnet", "d_task_defaults", "d_task_defaults@compile_codec_whole=1",
                    "d_task_defaults@compile=max-autotune-no-cudagraphs"], profile="d_task_defaults"),
    # Round 3: the two switches not yet measured, on each missed target. (b) at batch 64: whole-UNet
    # compile (no eager glue between regions) and cuDNN's algorithm search, against the regional
    # default of the same run; then (d) and (c) adaptation with the same two.
    "h200_b": Plan(["peak", "a_plain", f"{B64}@compile_regional=0", B64, f"{B64}@cudnn_benchmark=1"],
                   profile=f"{B64},{B64}@compile_regional=0"),
    "h200_d2": Plan(["peak", "d_plain_controlnet", "d_task_defaults", "d_task_defaults@cudnn_benchmark=1",
                     "d_task_defaults@compile_regional=0"], profile="d_task_defaults,d_task_defaults@compile_regional=0"),
    "h200_c2": Plan(["peak", "a_plain", STITCH, ADAPT, f"{ADAPT}@cudnn_benchmark=1"], profile=ADAPT),
    # Next for (b): channels-last intermediates forced in every compiled graph (the copies at every
    # level of the profile), by block and whole; then the whole UNet under inductor's CUDA graphs
    # (the 5% of the whole-compiled step outside kernels) and cuDNN's search.
    "h200_b2": Plan(["peak", "a_plain", B64, f"{B64}@force_layout_opt=1", f"{B64}@compile_regional=0;force_layout_opt=1"],
                    profile=f"{B64}@force_layout_opt=1"),
    "h200_b3": Plan(["peak", "a_plain", f"{B64}@{TRAIN}", B64, f"{B64}@cudnn_benchmark=1"], profile=f"{B64}@{TRAIN}"),
    # (c) with the VAE encoder compiled whole (its eager glue: ~3% of the adaptation step);
    # adaptation first: its graphs cover stitching's.
    "h200_c3": Plan(["peak", ADAPT, f"{ADAPT}@compile_codec_whole=1", f"{STITCH}@compile_codec_whole=1", STITCH],
                    profile=f"{ADAPT}@compile_codec_whole=1"),
    # Round 5, with force_layout_opt and compile_codec_whole as defaults (round 4 measured them on
    # (b) and on (c) adaptation / (d)): (d) with the defaults and without the forced layout; (c)
    # both steps with the defaults; (b) the whole UNet under inductor's CUDA graphs (the 5% of the
    # step outside kernels) against the whole UNet without them, then batch 96.
    "h200_d3": Plan(["peak", "d_plain_controlnet", "d_task_defaults", "d_task_defaults@force_layout_opt=0"],
                    profile="d_task_defaults"),
    "h200_c4": Plan(["peak", ADAPT, STITCH], profile=ADAPT),
    "h200_b4": Plan(["peak", "a_plain", f"{B64}@{TRAIN}", f"{B64}@compile_regional=0", B96], profile=f"{B64}@{TRAIN}"),
    # Round 6: the training-only override model.perf.train = TRAIN (round 5: (b) 1.47x at batch 64,
    # 1.489-1.498x at 96). (b) at batch 128 (its FLOPs fitted above 64; the CUDA-graph pools of a row
    # now freed before the next), profiled in its own Lightning loop; (c) both steps under it (a
    # default only if (c) does not lose). Then without the per-step wait for the progress bar's
    # loss, and what sd15.yaml's EMA (0.9999) costs that step: diffusers' per-tensor loop vs
    # foreach_ema (same graphs: a third of the cost).
    "h200_b5": Plan(["peak", "a_plain", f"{B128}@{TRAIN}", f"{B128}@{TRAIN};{LAGGED}",
                     f"{B128}@{TRAIN};ema_decay=0.9999", f"{B128}@{TRAIN};ema_decay=0.9999;foreach_ema=1",
                     f"{B96}@{TRAIN};cudnn_benchmark=1"], profile=f"{B128}@{TRAIN}"),
    "h200_c5": Plan(["peak", f"{STITCH}@{TRAIN}", f"{ADAPT}@{TRAIN}"]),
    # Round 6 on an H100 (the issue's own card; none lent since round 1): every target with the
    # project defaults of rounds 2-5. (b) by block at batch 64 (bs96 needs 85.5 GiB under the
    # override, more than an H100 has) and under the training override; the framework alone; then
    # (c) both steps and the loader; then (d) and (c) stitching under the override.
    "h100_b6": Plan(["peak", "a_plain", "b_task_off", B64, f"{B64}@{TRAIN}"], profile=B64),
    "h100_c6": Plan(["peak", STITCH, ADAPT, "e"], profile=f"{STITCH},{ADAPT}"),
    "h100_d6": Plan(["peak", "d_plain_controlnet", "d_task_defaults", f"{STITCH}@{TRAIN}"], profile="d_task_defaults"),
    # Round 7 on an H100. (b) at batch 64 under the training override and by block, each with and
    # without the per-step wait for the progress bar's loss (lagged_progress_loss: same graphs): the
    # step had 2% (by block, h100w) to 6% (override, H200 h200o) of its time outside kernels.
    "h100_b7": Plan(["peak", "a_plain", f"{B64}@{TRAIN}", f"{B64}@{TRAIN};{LAGGED}", B64, f"{B64}@{LAGGED}"],
                    profile=f"{B64}@{TRAIN};{LAGGED}"),
    # (c) at batch 32 (run with --task-batch 32: +2.4-3.5% in h100z) under the override (stitching
    # +1.6% at batch 16, h100y; adaptation first, never timed under it, so that stitching reuses
    # its graphs). (b) under the override at the batches between 64 (41.9% MFU, h100_r7b) and 96
    # (85.5 GiB on the H200, more than an H100 has).
    "h100_c7": Plan(["peak", f"{ADAPT}@{TRAIN}", f"{STITCH}@{TRAIN}"], profile=f"{ADAPT}@{TRAIN}"),
    "h100_b8": Plan(["peak", "a_plain", f"b_task_defaults_bs80@{TRAIN}", f"b_task_defaults_bs72@{TRAIN}"],
                    profile=f"b_task_defaults_bs80@{TRAIN}"),
    # With the override a default (and batches 72 / 32 the bench's): every training target in one
    # call, against one baseline and one measured peak.
    "h100_r7": Plan(["peak", "a_plain", "b_task_defaults_big", ADAPT, STITCH]),
    # Round 7 on an H200 (no H100 lent): (c) both steps under the override, adaptation first (plan
    # h100_c7 at batch 16), then the same two by block on the same warm machine (plan h200_c4), for
    # the decision on the default. (b) at batch 80 (the most that should fit an H100's 80 GB under
    # the override: 60.8 GiB at 64, 85.5 at 96): its memory and samples/s, then the rows that reuse
    # its graphs: the progress bar's lagged loss, sd15.yaml's EMA per tensor and foreach; last, by
    # block at the same batch.
    "h200_b7": Plan(["peak", "a_plain", f"b_task_defaults_bs80@{TRAIN}", f"b_task_defaults_bs80@{TRAIN};{LAGGED}",
                     f"b_task_defaults_bs80@{TRAIN};ema_decay=0.9999",
                     f"b_task_defaults_bs80@{TRAIN};ema_decay=0.9999;foreach_ema=1", "b_task_defaults_bs80"],
                    profile=f"b_task_defaults_bs80@{TRAIN}"),
    "all": Plan(["peak", *SECTIONS["a"], *SECTIONS["b"], *SECTIONS["c"], *SECTIONS["d"], "vae", "e", "attn",
                 "a_compile"]),
}


def parse_settings(spec: str) -> dict:
    out = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        out[key] = {"1": True, "0": False, "true": True, "false": False}.get(value, None if value == "none" else value)
    return out


def project_defaults() -> dict:
    """``model.perf`` as a user's SD1.5 config has it (experiments/stitching/sd15.yaml)."""
    from icp.core import config as cfglib

    cfg = cfglib.load(ROOT / "experiments" / "stitching" / "sd15.yaml", ["model.backbone.path=null"])
    return perf.settings(dict(cfg.model.perf))


class Bench:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.size = dict(SIZES["tiny" if args.tiny else "full"])
        for key in ("batch", "big_batch", "task_batch"):  # --batch, --big-batch, --task-batch (0: the size's)
            self.size[key] = getattr(args, key) or self.size[key]
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.defaults = perf.settings({**project_defaults(), **parse_settings(args.perf)})
        self.results: list[common.Result] = []
        self.peak = float("nan")
        self.loader: dict = {}
        self.profiles: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.notes: list[str] = []
        self.tag = f"_{args.tag}" if args.tag else (f"_{args.plan}" if args.plan and not args.tiny else "")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self._d_flops: float | None = None
        self._d_ref: tuple[str, torch.Tensor] | None = None
        profile = args.profile if args.profile is not None else PLANS[args.plan].profile if args.plan else ""
        self.profile_rows = set(filter(None, profile.split(",")))
        self.on = self.defaults  # the report prints it as "settings 'on'"
        self.variant: dict = {}  # switches over the defaults for the current row (``row@key=value``)
        self.suffix = ""

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

    def perf_node(self, mode: str, variant: dict | None = None) -> dict:
        """``model.perf`` of a row: OFF, or the defaults with ``variant`` (default: the current
        ``row@key=value`` one). A variant's switches hold in training too: they replace the same
        keys of ``train``."""
        if mode == "off":
            return dict(perf.OFF)
        variant = self.variant if variant is None else variant
        switches = {k: v for k, v in variant.items() if k not in TASK_KEYS}
        train = {k: v for k, v in self.defaults.get("train", {}).items() if k not in switches}
        return perf.settings({**self.defaults, **switches, "train": train})

    def uses_cudagraphs(self, variant: dict | None = None) -> bool:
        """Whether a row's defaults (``variant``: the current one) record inductor's CUDA graphs,
        in training or sampling."""
        node = self.perf_node("defaults", variant)
        return perf.uses_cudagraphs(node) or perf.uses_cudagraphs(perf.training_settings(node))

    def optimizer(self, mode: str):
        """The config's ``optimizer: {_target_: torch.optim.AdamW, _partial_: true, ...}``."""
        extra = {"fused": True} if mode == "off" and self.device.type == "cuda" else {}
        return functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=1e-2, **extra)

    # -------------------------------------------------------------------------------- recording
    def record(self, name, section, batch, timing, flops, settings=None, **extra) -> common.Result:
        name += self.suffix
        result = common.Result(name, section, batch, timing["ms"], flops, common.peak_memory_gib(self.device),
                               settings or {}, {"ms_min": timing["ms_min"], "ms_max": timing["ms_max"], **extra})
        self.results.append(result)
        row = result.row(self.peak, None)
        print(f"[{self.elapsed:6.0f}s] {name:28s} {row['samples_per_s']:9.2f} samples/s "
              f"{row['tflops']:7.1f} TFLOP/s  mfu {row['mfu']:.2f}  {row['peak_gib']:.1f} GiB", flush=True)
        self.save()
        return result

    @property
    def elapsed(self) -> float:
        return time.time() - self.started

    def save(self) -> None:
        write_report(self.out, self)

    def guarded(self, name: str, fn) -> None:
        base, _, spec = name.partition("@")
        cost = ROW_COST_S.get("b_task_defaults_big" if BATCH_ROW.fullmatch(base) else base, 60)
        variant = parse_settings(spec.replace(";", ","))
        core = ";".join(item for item in spec.split(";") if item and item.partition("=")[0] not in GRAPH_NEUTRAL)
        ran = base + (f"+{core}" if core else "")
        if variant and core != spec and any(r.name == ran for r in self.results):
            # Same compiled graphs as the row that just ran: inductor's cache answers (H200: 49 s
            # for d_task_defaults@cudnn_benchmark=1 after d_task_defaults' 150 s). After a row with
            # inductor's CUDA graphs dynamo compiles again (tasks.free), from the on-disk caches.
            cost = cost * 2 // 3 if self.uses_cudagraphs(variant) else max(30, cost // 3)
        if str(variant.get("compile", "")).startswith("max-autotune"):
            # Autotuning benchmarks every kernel choice per shape: (d) at max-autotune ran past
            # 300 s of tuning on the H200 (h200l) and was cut off by the call's limit.
            cost *= 3
        if self.args.budget and not self.tiny and self.elapsed + cost > self.args.budget:
            self.errors[name] = (f"skipped: {self.args.budget - self.elapsed:.0f} s of the --budget left, "
                                 f"the row needs ~{cost} s")
            print(f"[{self.elapsed:6.0f}s] {name}: {self.errors[name]}", flush=True)
            return
        self.variant, self.suffix = variant, (f"+{spec}" if spec else "")
        try:
            fn()
        except Exception as err:  # noqa: BLE001 -- one failed variant must not lose the others
            self.errors[name] = common.error_line(err)
            traceback.print_exc()
        finally:
            graphs = self.uses_cudagraphs()
            self.variant, self.suffix = {}, ""
            torch.backends.cudnn.benchmark = False  # a row's cudnn_benchmark=1 is process-wide
            tasks.free(recompile=graphs)
            self.save()

    def wants_profile(self, name: str) -> bool:
        if name == f"b_task_defaults_bs{self.size['big_batch']}" and "b_task_defaults_big" in self.profile_rows:
            return True  # the row b_task_defaults_big runs (and is recorded) under its batch's name
        name += self.suffix  # a variant row is profiled under its own name (ROW+key=value)
        return name in self.profile_rows or name.replace("+", "@", 1) in self.profile_rows

    def maybe_profile(self, name: str, step) -> None:
        if self.wants_profile(name):
            name += self.suffix
            from icp.bench.report import profile_table

            self.profiles[name] = profile_table(step, self.device, timed_ms=self.results[-1].ms)

    # -------------------------------------------------------------------------------- (peak), (a)
    def row_peak(self) -> None:
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
        if self.device.type == "cuda":
            perf.compile_module(parts.unet, switches.get("compile"), regional=switches.get("regional", True))
        common.reset_memory(self.device)
        timing = common.time_steps(step, self.device, self.size["warmup"], self.size["iters"])
        self.record(name, "a", batch, timing, flops, switches)
        self.maybe_profile(name, step)
        perf.set_sdpa_backend("auto")

    def row_a_plain(self) -> None:
        n, b = self.latent, self.size["batch"]
        self.plain_train("a_plain", b, (n, n), {})

    def row_a_plain_canvas(self) -> None:
        n = self.latent
        self.plain_train("a_plain_canvas", self.size["canvas_batch"], (n, 2 * n), {})

    def row_a_variants(self) -> None:
        n, b = self.latent, self.size["batch"]
        for spec in filter(None, self.args.plain_variants.split(";")):
            name = "a_" + spec.replace("=", "").replace(",", "_")
            self.guarded(name, lambda spec=spec, name=name: self.plain_train(name, b, (n, n), parse_settings(spec)))

    def row_a_compile(self) -> None:
        n, b = self.latent, self.size["batch"]
        self.plain_train("a_compiledefault", b, (n, n), {"compile": "default"})

    # -------------------------------------------------------------------------------- (b), (c)
    def fit_task(self, name, section, task, batch, n_samples) -> None:
        # FLOPs eagerly, before setup() compiles anything (see plain_train); large batches fitted
        # (common.count_flops_fitted: the eager step under the counter needs more memory).
        flops = common.count_flops_fitted(
            lambda n: (lambda: tasks.manual_step(task, tasks.batch_head(batch, n), self.device)), n_samples)
        common.reset_memory(self.device)
        # A profiled row is profiled in the same Lightning loop, two steps after the timed ones: the
        # whole step (optimizer, hooks, host gaps), under the row's own compile mode and graphs.
        profile_steps = 2 if self.wants_profile(name) else 0
        timing = tasks.fit_and_time(task, batch, self.device, self.size["warmup"], self.size["iters"],
                                    profile_steps=profile_steps)
        settings = {"perf": task.perf_config, "applied": task.perf_applied, "ema_decay": task.ema_decay,
                    "optimizer_fused": bool(timing.pop("optimizer_fused", False))}
        profile = timing.pop("profile", None)
        self.record(name, section, n_samples, timing, flops, settings, first_steps_s=timing.get("first_steps_s"))
        if profile is not None:
            self.profiles[name + self.suffix] = "(the Lightning training step, optimizer included)\n" + profile
        perf.set_sdpa_backend("auto")

    def denoise_row(self, name: str, mode: str, batch_size: int) -> None:
        from icp.bench.tasks import DenoiseTask

        n = self.latent
        parts = self.backbone(latent_codec=True)
        task = DenoiseTask(parts, optimizer=self.optimizer(mode), train_unet="full", perf=self.perf_node(mode),
                           ema_decay=float(self.variant.get("ema_decay", 0.0)))
        batch = tasks.image_batch(batch_size, parts.unet.config.in_channels, (n, n), self.device)
        self.fit_task(name, "b", task, batch, batch_size)

    def row_b_task_off(self) -> None:
        self.denoise_row("b_task_off", "off", self.size["batch"])

    def row_b_task_defaults(self) -> None:
        self.denoise_row("b_task_defaults", "defaults", self.size["batch"])

    def row_b_task_defaults_big(self) -> None:
        big = self.size["big_batch"]
        self.denoise_row(f"b_task_defaults_bs{big}", "defaults", big)

    def row_method(self, base: str):
        match = BATCH_ROW.fullmatch(base)
        if match:  # b_task_defaults_bsN
            return functools.partial(self.denoise_row, base, "defaults", int(match.group(1)))
        return getattr(self, f"row_{base}")

    def task_row(self, kind: str, mode: str) -> None:
        r, b = self.size["res"], self.size["task_batch"]
        if kind == "stitching":
            from icp.tasks.stitching import StitchingTask as Task
        else:
            from icp.tasks.adaptation import AdaptationTask as Task
        task = Task(self.backbone(), optimizer=self.optimizer(mode), train_unet="frozen", perf=self.perf_node(mode))
        self.fit_task(f"c_{kind}_{mode}", "c", task, tasks.image_batch(b, 3, (r, r), self.device), b)

    def row_c_stitching_off(self) -> None:
        self.task_row("stitching", "off")

    def row_c_stitching_defaults(self) -> None:
        self.task_row("stitching", "defaults")

    def row_c_adaptation_off(self) -> None:
        self.task_row("adaptation", "off")

    def row_c_adaptation_defaults(self) -> None:
        self.task_row("adaptation", "defaults")

    # -------------------------------------------------------------------------------- (d)
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
        node = self.perf_node("off" if mode == "off" else "defaults")
        if mode == "defaults_nograph":
            node["cuda_graph_sampling"] = False
        if mode == "defaults_nocompile":
            node["compile"] = "none"
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

    def row_d_task_defaults_nograph(self) -> None:
        self.task_sample_row("defaults_nograph")

    def row_d_task_defaults_nocompile(self) -> None:
        self.task_sample_row("defaults_nocompile")

    # -------------------------------------------------------------------------------- attention, vae, (e)
    def row_attn(self) -> None:
        from icp.bench import attn

        attn.run(self)

    def row_vae(self) -> None:
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

    def row_e(self) -> None:
        from icp.bench import loader

        cores = common._cpu_count()
        workers = sorted({max(1, cores - 2), max(1, cores // 4)}) if not self.tiny else [0, 1]
        self.loader = loader.run(self.size["loader_ids"], self.size["loader_views"], self.size["res"],
                                 self.size["loader_batch"], workers, self.size["loader_batches"],
                                 render_workers=max(1, cores))
        self.loader["cores"] = cores
        print("loader:", json.dumps(self.loader), flush=True)

    # -------------------------------------------------------------------------------- driver
    def rows(self) -> list[str]:
        if self.args.only:
            names = []
            for item in filter(None, self.args.only.split(",")):
                names += SECTIONS.get(item, [item])
            if "peak" not in names:
                names.insert(0, "peak")
        else:
            names = PLANS[self.args.plan or "all"].rows
        unknown = [n for n in names if n.partition("@")[0] not in ROW_COST_S
                   and not BATCH_ROW.fullmatch(n.partition("@")[0])]
        if unknown:
            raise SystemExit(f"bench_train: unknown row/section '{unknown[0]}'; rows: {', '.join(ROW_COST_S)}; "
                             f"sections: {', '.join(SECTIONS)}")
        return names

    def run(self) -> None:
        self.env = common.environment(self.device)
        print(json.dumps(self.env), flush=True)
        print("perf defaults measured:", json.dumps(self.defaults), flush=True)
        for name in self.rows():
            self.guarded(name, self.row_method(name.partition("@")[0]))
        self.notes.append(f"total wall time {self.elapsed:.0f} s")
        self.save()
        print((self.out / f"bench_train{self.tag}.md").read_text())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke run of every row)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even where a GPU exists")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--plan", default="", choices=["", *PLANS], help="an ordered row list (default: all)")
    p.add_argument("--only", default="", help="comma list of rows or sections (a,b,c,d,vae,e,late), in order; "
                   "ROW@key=value[;key=value] runs a 'defaults' row with switches changed (named ROW+key=value)")
    p.add_argument("--budget", type=float, default=0, help="seconds: skip rows whose estimate no longer fits")
    p.add_argument("--batch", type=int, default=0, help="override the (a)/(b) batch size")
    p.add_argument("--big-batch", type=int, default=0, help="override the batch of b_task_defaults_big")
    p.add_argument("--task-batch", type=int, default=0, help="override the batch of the (c) rows (32)")
    p.add_argument("--perf", default="", help="key=value list over the config's model.perf for 'defaults' rows")
    p.add_argument("--plain-variants", default="channels_last=1;sdpa=flash;sdpa=cudnn;sdpa=efficient",
                   help="';'-separated switch sets timed on the plain loop (row a_variants)")
    p.add_argument("--tag", default="", help="suffix of the result file names (default: the plan's name)")
    p.add_argument("--profile", default=None, help="comma list of rows to profile (torch.profiler table); "
                                                   "default: the plan's slowest-vs-target row")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        args.plan = args.plan or "all"
    Bench(args).run()


if __name__ == "__main__":
    main()
