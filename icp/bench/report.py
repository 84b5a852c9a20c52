"""The results table (markdown + json), target checks, and torch.profiler summaries."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .plan import load_targets

# The compiled peers (icp.bench.peer) and the rows read against the best of them (issue 29):
# icp's training rows under its defaults against the best a_peer_* row, its sampling rows against
# d_peer_*. The "off" rows stay against the eager loops (the framework's own cost).
PEERS = {"b_task_defaults": "a_peer_", "d_task_defaults": "d_peer_"}


# Which row each row is compared with ("vs" column): same work, plainest implementation.
def baseline_of(name: str) -> str | None:
    name = name.partition("+")[0]  # a variant row (``row+key=value``) compares like its row
    if name == "a_plain_canvas":
        return None
    if name.startswith(("a_", "b_")):
        return "a_plain" if name != "a_plain" else None
    if name.startswith("c_"):
        stem = name.rsplit("_", 1)[0]
        return f"{stem}_off" if not name.endswith("_off") else None
    if name.startswith(("d_task", "d_peer")):  # a peer against the eager loop it compiles
        return "d_plain_controlnet"
    if name == "d_plain_controlnet":
        return "d_plain_unet"
    return None


def best_row(table: list[dict], prefix: str, max_gib: float | None = None) -> dict | None:
    """The fastest row (samples/s) whose name starts with ``prefix``, among those that fit
    ``max_gib`` (a row whose peak memory is unknown, as on CPU, fits); None if there is none."""
    fits = [r for r in table if r["name"].startswith(prefix) and not math.isnan(r["samples_per_s"])
            and not (max_gib is not None and r["peak_gib"] > max_gib)]
    return max(fits, key=lambda r: r["samples_per_s"], default=None)


def vs_of(name: str, peers: dict[str, dict | None]) -> str | None:
    """The row ``name`` is compared with: the best peer of its kind where the run has one."""
    base = name.partition("+")[0]
    for prefix, peer in PEERS.items():
        if base.startswith(prefix) and peers.get(peer) is not None:
            return peers[peer]["name"]
    return baseline_of(name)


def rows(bench) -> list[dict]:
    table = [r.row(bench.peak, None) for r in bench.results]
    limit = load_targets()["training"]["max_peak_gib"]
    peers = {p: best_row(table, p, limit) for p in PEERS.values()}
    by_name = {r["name"]: r for r in table}
    for r in table:
        r["vs"] = vs_of(r["name"], peers)
        base = by_name.get(r["vs"] or "")
        r["vs_baseline"] = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
    return table


def targets(bench, table: list[dict], rules: dict | None = None) -> list[str]:
    """The verdicts (rules: experiments/perf/targets.yaml), every ratio against the best
    compiled peer of the same run."""
    rules = rules or load_targets()
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

    def against_peer(label, tried, peer_prefix, rule, mfu=None):
        """The best of ``tried`` (icp's rows of one kind) against the best ``peer_prefix`` row."""
        limit = rules["training"]["max_peak_gib"]
        best, peer = best_row(tried, "", limit), best_row(table, peer_prefix, limit)
        if best is None:
            return
        if peer is None:
            out.append(f"- n/a {label}: no compiled peer row ({peer_prefix}*) ran in this run")
            return
        ratio = best["samples_per_s"] / peer["samples_per_s"]
        mfu_ok = mfu is None or best["mfu"] >= mfu
        need = f">= {rule:.2f}x the best compiled peer" + (f", >= {mfu:.0%} MFU" if mfu is not None else "")
        check(f"{label} {need}", ratio >= rule and mfu_ok,
              f"{best['name']} (batch {best['batch']}) {ratio:.2f}x {peer['name']} (batch {peer['batch']})"
              + (f", MFU {best['mfu']:.1%}" if mfu is not None else ""), best, tried)

    train = rules["training"]
    against_peer("training", [r for r in table if r["name"].startswith("b_task_defaults")], "a_peer_",
                 train["vs_best_peer"], train["mfu"])
    if "b_task_off" in by and "a_plain" in by:
        r, within = by["b_task_off"]["samples_per_s"] / by["a_plain"]["samples_per_s"], rules["framework"]["within"]
        check(f"framework: settings off within {within:.0%} of the eager plain loop", abs(r - 1) <= within, f"{r:.3f}x")
    for r in table:
        if r["name"].startswith("c_") and r["name"].partition("+")[0].endswith("_defaults"):
            stem, need = r["name"].partition("+")[0], rules["steps"]["mfu"]
            variants = [v for v in table if v["name"].partition("+")[0] == stem]
            check(f"steps: {r['name']} >= {need:.0%} MFU", r["mfu"] >= need, f"MFU {r['mfu']:.1%}", r, variants,
                  fmt=lambda v: f"MFU {v['mfu']:.1%}")
    sampling = [r for r in table if r["name"].startswith("d_task") and r["name"] != "d_task_off"]
    against_peer("sampling", sampling, "d_peer_", rules["sampling"]["vs_best_peer"])
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


def machine(env: dict) -> str:
    """The machine of a run, in words (the results file names it first)."""
    soft = ", ".join(f"{k} {env[k]}" for k in ("torch", "diffusers", "lightning", "cuda", "cudnn") if k in env)
    if env.get("gpu"):
        return (f"{env['gpu']} ({env.get('sms')} SMs, {env.get('gpu_mem_gib')} GiB), {env.get('cpu_count')} CPU "
                f"cores; {soft}")
    return f"no GPU ({env.get('device', 'cpu')}, {env.get('cpu_count')} CPU cores; a smoke run, not a measurement); {soft}"


def peer_summary(table: list[dict]) -> list[str]:
    """The compiled peer rows of the run and icp's rows read against the best of them."""
    lines = []
    for label, peer in (("Training", "a_peer_"), ("Sampling", "d_peer_")):
        peers = [r for r in table if r["name"].startswith(peer)]
        if not peers:
            continue
        if not lines:
            lines = ["## Against the compiled peer (plain diffusers + torch.compile, icp.bench.peer)", "",
                     "| kind | row | batch | samples/s | MFU | peak GiB | vs | ratio |", "|---|---|---|---|---|---|---|---|"]
        for r in peers + [r for r in table if r["vs"] in {p["name"] for p in peers}]:
            lines.append(f"| {label} | {r['name']} | {r['batch']} | {r['samples_per_s']:.2f} | {r['mfu']:.1%} | "
                         f"{r['peak_gib']:.1f} | {r['vs'] or '-'} | {r['vs_baseline']:.2f} |")
    return lines + [""] if lines else []


def write_report(out: Path, bench) -> None:
    table = rows(bench)
    data = {"environment": getattr(bench, "env", {}), "peak_bf16_tflops": bench.peak, "sizes": bench.size,
            "perf_defaults": bench.on, "rows": table, "loader": bench.loader, "errors": bench.errors,
            "targets": targets(bench, table), "notes": bench.notes, "profiles": bench.profiles}
    (out / f"bench_train{bench.tag}.json").write_text(json.dumps(data, indent=1, default=str))
    lines = ["# Training / sampling benchmark (eval/bench_train.py)", "",
             "Machine: " + machine(data["environment"]), "",
             f"bf16 matmul peak measured in this run: {bench.peak:.1f} TFLOP/s (MFU denominator).", "",
             *peer_summary(table), "## Targets (experiments/perf/targets.yaml)", *data["targets"], "",
             "## All rows", "",
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
