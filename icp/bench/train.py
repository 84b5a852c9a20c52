"""GPU training / sampling / loader benchmark (issues 9, 29): one run, one table.

    python eval/bench_train.py --budget 460 --out DIR        # the default plan "peer_train" (GPU, one call)
    python eval/bench_train.py --plan peer_sample ...        # another plan (peer_sample, steps, switches)
    python eval/bench_train.py --only ROWS --budget 500 ...  # rows the budget skipped, or a question
    python eval/bench_train.py --tiny --out /tmp/bench_tiny  # every code path, tiny, CPU, minutes

The plans (icp.bench.plan.PLANS) run the targets' rows under the project defaults, against one
measured peak, within one GPU call each; the verdicts follow experiments/perf/targets.yaml, every
ratio against the best compiled-peer row of the same run (eval/gpu/bench_peer.sh runs them).

Rows (``--only``: row names or section letters, in order; ``ROW@key=value`` changes switches):

- peak: bf16 matmul rate, the MFU denominator;
- a: the plain diffusers train step (eager: ``a_plain``) and its 64x128 canvas version;
- peer: the compiled peer (icp.bench.peer): ``a_peer_<default|ro>_bsN``, the plain step with
  ``torch.compile(unet)`` (default / reduce-overhead) at batch N (``a_peer``: each of ``--peer-batches``
  in both modes); ``d_peer_<default|ro>``, the plain ControlNet loop compiled as diffusers' docs do;
- b: the same denoising step through icp's task and ``lightning.Trainer``: ``b_task_off``
  (``model.perf`` all off: the framework alone), ``b_task_defaults`` (the project's defaults, read
  from experiments/stitching/sd15.yaml's ``model.perf``) and ``b_task_defaults_big`` (defaults at a
  larger batch, from the memory they save);
- c: the full Lighting-Aware Stitching / View-Consistent Adaptation steps at 512 px, off / defaults;
- d: sampling (30 DDIM steps, CFG): plain diffusers loops (``d_plain_unet``, ``d_plain_controlnet``
  = the same models as StitchingTask.sample) vs ``task.sample`` as evaluation calls it (no
  trainer) with perf off / defaults / defaults without the CUDA graph;
- e: the shard loader's samples/s with this machine's cores (``icp.bench.data.loader_rates``, the
  loader benchmark of eval/bench_data.py).

``b_task_defaults_bsN``: the (b) defaults row at batch N (``_big`` = ``--big-batch``). Task rows are
built as a config builds them (``perf=<model.perf>``, an AdamW ``_partial_``; "off" rows fuse it as
(a) does). FLOPs are counted eagerly before compilation, on two small batches and scaled linearly
above them (common.count_flops_fitted: every row, any batch); ``--budget`` skips a row whose estimated
time (plan.ROW_COST_S) no longer fits, and the table (bench_train[_TAG].{json,md} in --out) is rewritten
after each row.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
import traceback
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from icp.bench import common, plain, tasks  # noqa: E402
from icp.bench.peer import PeerRows  # noqa: E402
from icp.bench.plan import (ALL_ROWS, BATCH_ROW, GRAPH_NEUTRAL, PLAN, PLAN_PROFILE, PLANS, PEER_SAMPLE,  # noqa: E402,F401
                            PEER_TRAIN, ROW_COST_S, SECTIONS, SIZES, TASK_KEYS, known_row, parse_settings, row_cost)
from icp.bench.sampling import SamplingRows  # noqa: E402
from icp.bench.report import write_report  # noqa: E402

from icp import perf  # noqa: E402
from icp.core.paths import REPO, RESULTS  # noqa: E402
from icp.models import backbone as bb  # noqa: E402

ROOT = REPO


def project_defaults() -> dict:
    """``model.perf`` as a user's SD1.5 config has it (experiments/stitching/sd15.yaml)."""
    from icp.core import config as cfglib

    cfg = cfglib.load(ROOT / "experiments" / "stitching" / "sd15.yaml", ["model.backbone.path=null"])
    return perf.settings(dict(cfg.model.perf))


class Bench(SamplingRows, PeerRows):
    """One benchmark run: builds each row as a config would, times it, writes the table after each row."""

    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.size = dict(SIZES["tiny" if args.tiny else "full"])
        for key in ("batch", "big_batch", "task_batch"):  # --batch, --big-batch, --task-batch (0: the size's)
            self.size[key] = getattr(args, key) or self.size[key]
        if args.peer_batches:
            if not all(b.strip().isdigit() and int(b) > 0 for b in args.peer_batches.split(",")):
                raise SystemExit(f"bench_train: --peer-batches={args.peer_batches!r} must be positive whole numbers, "
                                 "comma-separated (e.g. 32,64)")
            self.size["peer_batches"] = tuple(int(b) for b in args.peer_batches.split(","))
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.defaults = perf.settings({**project_defaults(), **parse_settings(args.perf)})
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
        self._d_flops: float | None = None
        self._d_ref: tuple[str, torch.Tensor] | None = None
        profile = args.profile if args.profile is not None else "" if (args.only or args.tiny) else PLAN_PROFILE
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
        ``row@key=value`` one)."""
        if mode == "off":
            return dict(perf.OFF)
        variant = self.variant if variant is None else variant
        switches = {k: v for k, v in variant.items() if k not in TASK_KEYS}
        return perf.settings({**self.defaults, **switches})

    def uses_cudagraphs(self, variant: dict | None = None) -> bool:
        """Whether a row's defaults (``variant``: the current one) record inductor's CUDA graphs,
        in training or sampling."""
        return perf.uses_cudagraphs(self.perf_node("defaults", variant))

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
        cost = row_cost(base)
        variant = parse_settings(spec.replace(";", ","))
        core = ";".join(item for item in spec.split(";") if item and item.partition("=")[0] not in GRAPH_NEUTRAL)
        ran = base + (f"+{core}" if core else "")
        if variant and core != spec and any(r.name == ran for r in self.results):
            # Same compiled graphs as the row that just ran: inductor's cache answers (H200: 49 s
            # for a graph-neutral variant of d_task_defaults after its 150 s). After a row with
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
            # A peer row's compiled nets are dropped with dynamo's code: nothing later reuses them.
            graphs = self.uses_cudagraphs() or base.startswith(("a_peer", "d_peer"))
            self.variant, self.suffix = {}, ""
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

    def plain_train(self, name, batch, hw, settings: dict, compile_mode: str | None = None) -> None:
        """The plain train step, eager or (``compile_mode``) as the compiled peer (icp.bench.peer)."""
        parts = self.backbone()
        # Count FLOPs before compiling: dynamo refuses to trace under the counter's dispatch mode
        # and then leaves the code eager for good (seen on the H100: compile measured 1.00x). On
        # small batches, scaled to this one: an eager step at the compiled peer's batch 64 ran out
        # of memory on the H100.
        flops = common.count_flops_fitted(lambda n: plain.PlainTrainStep(parts, n, hw, self.device), batch)
        step = plain.PlainTrainStep(parts, batch, hw, self.device, mark_steps=compile_mode == "reduce-overhead")
        if compile_mode:
            from icp.bench.peer import compile_peer

            step.unet = compile_peer(step.unet, compile_mode, self.device)
        common.reset_memory(self.device)
        timing = common.time_steps(step, self.device, self.size["warmup"], self.size["iters"])
        self.record(name, "a", batch, timing, flops, settings, first_steps_s=timing["warmup_s"])
        self.maybe_profile(name, step)

    def row_a_plain(self) -> None:
        n, b = self.latent, self.size["batch"]
        self.plain_train("a_plain", b, (n, n), {})

    def row_a_plain_canvas(self) -> None:
        n = self.latent
        self.plain_train("a_plain_canvas", self.size["canvas_batch"], (n, 2 * n), {})

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
        match = PEER_TRAIN.fullmatch(base)
        if match:  # a_peer_<mode>_bsN
            return functools.partial(self.peer_train, match.group(1), int(match.group(2)))
        match = PEER_SAMPLE.fullmatch(base)
        if match:  # d_peer_<mode>
            return functools.partial(self.peer_sample, match.group(1))
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

    # -------------------------------------------------------------------------------- (e)
    def row_e(self) -> None:
        from icp.bench import data

        cores = common._cpu_count()
        workers = sorted({max(1, cores - 2), max(1, cores // 4)}) if not self.tiny else [0, 1]
        self.loader = data.loader_rates(self.size["loader_ids"], self.size["loader_views"], self.size["res"],
                                        self.size["loader_batch"], workers, render_workers=max(1, cores))
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
            names = ALL_ROWS if self.tiny else PLANS[self.args.plan]
        unknown = [n for n in names if not known_row(n.partition("@")[0])]
        if unknown:
            raise SystemExit(f"bench_train: unknown row/section '{unknown[0]}'; rows: {', '.join(ROW_COST_S)}, "
                             f"b_task_defaults_bsN, a_peer_<default|ro>_bsN; sections: {', '.join(SECTIONS)}")
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
    p.add_argument("--plan", default="peer_train", choices=sorted(PLANS), help="the rows to run (icp.bench.plan.PLANS)")
    p.add_argument("--only", default="", help="comma list of rows or sections (a,peer,b,c,d,e,all), "
                   "in order, instead of the plan; ROW@key=value[;key=value] runs a 'defaults' row with "
                   "switches changed (named ROW+key=value)")
    p.add_argument("--budget", type=float, default=0, help="seconds: skip rows whose estimate no longer fits")
    p.add_argument("--batch", type=int, default=0, help="override the (a)/(b) batch size")
    p.add_argument("--big-batch", type=int, default=0, help="override the batch of b_task_defaults_big")
    p.add_argument("--task-batch", type=int, default=0, help="override the batch of the (c) rows (32)")
    p.add_argument("--peer-batches", default="", help="comma list of batches of the row a_peer (default: 32,64)")
    p.add_argument("--perf", default="", help="key=value list over the config's model.perf for 'defaults' rows")
    p.add_argument("--tag", default="", help="suffix of the result file names (bench_train_TAG.md)")
    p.add_argument("--profile", default=None, help="comma list of rows to profile (torch.profiler table); "
                                                   f"default: the default plan's {PLAN_PROFILE}, none with --only")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    Bench(args).run()


if __name__ == "__main__":
    main()
