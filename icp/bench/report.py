"""The results table (markdown + json), target checks, and torch.profiler summaries."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .attn import KERNELS


# Which row each row is compared with ("vs" column): same work, plainest implementation.
def baseline_of(name: str) -> str | None:
    name = name.partition("+")[0]  # a variant row (``row+key=value``) compares like its row
    if name.startswith("attn_vae_"):
        return "attn_vae_sdpa" if name != "attn_vae_sdpa" else None
    if name.startswith("attn_"):  # attn_<case>_<kernel>[_padN] vs attn_<case>_auto
        parts = name.split("_")
        at = next((i for i, p in enumerate(parts) if p in KERNELS), len(parts))
        base = "_".join(parts[:at] + ["auto"])
        return base if base != name else None
    if name == "a_plain_canvas":
        return None
    if name.startswith(("a_", "b_")):
        return "a_plain" if name != "a_plain" else None
    if name.startswith("c_"):
        stem = name.rsplit("_", 1)[0]
        return f"{stem}_off" if not name.endswith("_off") else None
    if name.startswith("d_task"):
        return "d_plain_controlnet"
    if name == "d_plain_controlnet":
        return "d_plain_unet"
    if name.startswith("vae_") and name != "vae_fp32_autocast":
        return "vae_fp32_autocast"
    return None


def rows(bench) -> list[dict]:
    by_name = {r.name: r for r in bench.results}
    return [r.row(bench.peak, by_name.get(baseline_of(r.name) or "")) | {"vs": baseline_of(r.name)}
            for r in bench.results]


def targets(bench, table: list[dict]) -> list[str]:
    by = {r["name"]: r for r in table}
    out = []

    def check(label, ok, detail, best=None, tried=(), fmt=lambda r: f"{r['vs_baseline']:.2f}x"):
        out.append(f"- {'PASS' if ok else 'MISS'} {label}: {detail}")
        if ok or best is None:
            return
        # A miss says where its time went and what else this run tried for it.
        others = [r for r in tried if r["name"] != best["name"]]
        profiled = [r["name"] for r in (best, *others) if r["name"] in bench.profiles]
        if profiled:
            out.append("  - where the time goes: " + ", ".join(f"'Profile: {n}'" for n in profiled) + " below")
        if others:
            out.append("  - also tried in this run: " + ", ".join(f"{r['name']} {fmt(r)}" for r in others))
        out.append("  - earlier rounds: docs/history/performance.md")

    defaults = [r for r in table if r["name"].startswith("b_task_defaults")]
    if defaults:
        best = max(defaults, key=lambda r: r["samples_per_s"])
        check("(b) >= 1.5x baseline, >= 42% MFU", best["vs_baseline"] >= 1.5 and best["mfu"] >= 0.42,
              f"{best['name']} {best['vs_baseline']:.2f}x, MFU {best['mfu']:.1%}", best, defaults)
    if "b_task_off" in by and not math.isnan(by["b_task_off"]["vs_baseline"]):
        r = by["b_task_off"]
        check("(b) settings off within 3% of baseline", abs(r["vs_baseline"] - 1) <= 0.03, f"{r['vs_baseline']:.3f}x")
    for r in table:
        if r["name"].startswith("c_") and r["name"].partition("+")[0].endswith("_defaults"):
            stem = r["name"].partition("+")[0]
            variants = [v for v in table if v["name"].partition("+")[0] == stem]
            check(f"(c) {r['name']} >= 40% MFU", r["mfu"] >= 0.40, f"MFU {r['mfu']:.1%}", r, variants,
                  fmt=lambda v: f"MFU {v['mfu']:.1%}")
    tasks = [r for r in table if r["name"].startswith("d_task") and r["name"] != "d_task_off"]
    if tasks and "d_plain_controlnet" in by:
        best = max(tasks, key=lambda r: r["samples_per_s"])
        check("(d) icp sampling >= 2x the plain loop (same models)", best["vs_baseline"] >= 2,
              f"{best['name']} {best['vs_baseline']:.2f}x of d_plain_controlnet", best, tasks)
    if bench.loader and bench.loader.get("rates"):
        need = max((r["samples_per_s"] for r in table if r["name"].startswith("c_")), default=float("nan"))
        best = max(bench.loader["rates"], key=lambda r: r["samples_per_s"])
        if math.isnan(need):
            out.append(f"- n/a (e) loader: {best['samples_per_s']:.1f} samples/s with {best['workers']} workers; "
                       "no (c) row in this run to compare with")
            return out
        check("(e) loader never the bottleneck", not math.isnan(need) and best["samples_per_s"] >= need,
              f"{best['samples_per_s']:.1f} samples/s with {best['workers']} workers vs {need:.1f} consumed by (c)")
    return out


def _num(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.0f}"


def write_report(out: Path, bench) -> None:
    table = rows(bench)
    data = {"environment": getattr(bench, "env", {}), "peak_bf16_tflops": bench.peak, "sizes": bench.size,
            "perf_defaults": bench.on, "rows": table, "loader": bench.loader, "errors": bench.errors,
            "targets": targets(bench, table), "notes": bench.notes, "profiles": bench.profiles}
    (out / f"bench_train{bench.tag}.json").write_text(json.dumps(data, indent=1, default=str))
    lines = ["# Training / sampling benchmark (eval/bench_train.py)", "",
             "Environment: " + ", ".join(f"{k}={v}" for k, v in data["environment"].items()), "",
             f"bf16 matmul peak measured in this run: {bench.peak:.1f} TFLOP/s (MFU denominator).", "",
             "'off' rows: model.perf all off (icp.perf.OFF); 'defaults' rows: the config's model.perf "
             f"`{json.dumps(bench.on)}`", "",
             "| row | batch | samples/s | GFLOP/sample | TFLOP/s | MFU | peak GiB | ms/step | vs | ratio | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['name']} | {r['batch']} | {r['samples_per_s']:.2f} | {r['gflop_per_sample']:.0f} | "
                     f"{r['tflops']:.1f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} | {r['ms_per_step']:.1f} | "
                     f"{r['vs'] or '-'} | {r['vs_baseline']:.2f} | {_num(r.get('first_steps_s'))} |")
    same = [r for r in table if r.get("images_vs_ref")]
    if same:
        lines += ["", f"Sampling, images vs {same[0]['images_vs_ref']['ref']} (same noise; mean |diff| / "
                      "mean |ref|): " + ", ".join(f"{r['name']} {r['images_vs_ref']['rel_l1']:.4f}" for r in same)]
    kept = [r for r in table if r.get("graph_other_batch_vs_eager") is not None]
    if kept:
        lines += ["", "Graphed step reused on another batch B after batch A (mean |diff| / mean |ref|): graphed B "
                      "vs eager B; eager B vs eager A; graphed B vs eager A (right: ~0 / x / ~x; stale: ~x / x / ~0): "
                      + ", ".join(f"{r['name']} {r['graph_other_batch_vs_eager']:.4f} / "
                                  f"{r['other_batch_vs_first']:.4f} / "
                                  f"{r.get('graph_other_batch_vs_first', float('nan')):.4f}" for r in kept)]
    if bench.loader:
        lines += ["", "Loader (e): " + json.dumps(bench.loader)]
    lines += ["", "## Targets", *data["targets"]]
    if bench.notes:
        lines += ["", "## Notes", *[f"- {n}" for n in bench.notes]]
    if bench.errors:
        lines += ["", "## Not run / failed", *[f"- {k}: {v}" for k, v in bench.errors.items()]]
    for name, text in bench.profiles.items():
        lines += ["", f"## Profile: {name}", "```", text, "```"]
    (out / f"bench_train{bench.tag}.md").write_text("\n".join(lines) + "\n")


def profile_table(step, device: torch.device, steps: int = 2, rows_shown: int = 18,
                  timed_ms: float | None = None) -> str:
    """torch.profiler summary of ``steps`` calls: where the device time goes. On CUDA it starts
    with the kernels' busy time per call against the profiled wall time and the row's timed
    step (``timed_ms``): well below 100% means the GPU waits for the host (launches, syncs)."""
    from torch.profiler import profile

    step()
    with profile(activities=profiler_activities(device), record_shapes=device.type == "cuda") as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    return profile_summary(prof, device, steps, wall_ms, timed_ms, rows_shown)


def profiler_activities(device: torch.device) -> list:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def profile_summary(prof, device: torch.device, steps: int, wall_ms: float, timed_ms: float | None = None,
                    rows_shown: int = 18) -> str:
    """The table of a finished profile of ``steps`` calls (see :func:`profile_table`)."""
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows_shown, max_name_column_width=60)
    if device.type != "cuda":
        return table
    kernel_ms = kernel_time_us(prof.events()) / 1e3 / steps
    head = (f"kernels busy {kernel_ms:.1f} ms per call; profiled wall {wall_ms:.1f} ms "
            f"({kernel_ms / wall_ms:.0%} busy)")
    if timed_ms:
        head += f"; timed step {timed_ms:.1f} ms ({kernel_ms / timed_ms:.0%} of it in kernels)"
    return head + "\n" + table + copies_by_shape(prof, steps)


# Data-movement ops: where a step's copies come from is read off their shapes (which resolution,
# which channel count), as the time table alone does not say it.
COPY_OPS = ("aten::copy_", "aten::cat", "aten::clone", "aten::add_", "aten::add", "aten::contiguous",
            "aten::upsample_nearest2d", "aten::upsample_nearest2d_backward")


def copies_by_shape(prof, steps: int, rows_shown: int = 12) -> str:
    """The data-movement ops of a profile (:data:`COPY_OPS`) by input shape, most device time first."""
    def device_us(e) -> float:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in COPY_OPS and device_us(e) > 0]
    rows.sort(key=device_us, reverse=True)
    if not rows:
        return ""
    lines = [f"{device_us(e) / 1e3 / steps:8.2f} ms {e.count / steps:6.1f}x  {e.key:34s} {e.input_shapes}"
             for e in rows[:rows_shown]]
    return "\nData movement per call, by input shape (self device time, calls):\n" + "\n".join(lines) + "\n"


def kernel_time_us(events) -> float:
    """Summed duration of the device (kernel / memcpy) events of a profile, in microseconds.

    Annotated ranges on the device timeline (inductor's "## Call CompiledFxGraph ..." spans, once
    shapes are recorded) cover kernels already counted: left out, else busy time reads ~2x."""
    from torch.autograd import DeviceType

    total = 0.0
    for evt in events:
        if evt.device_type == DeviceType.CUDA and not getattr(evt, "is_user_annotation", False):
            total += evt.time_range.elapsed_us()
    return total
