"""Timing, FLOP counting, peak-rate measurement and environment facts for the benchmark.

Timing follows the device notes: warm up first (cuDNN autotune, compilation, allocator), then
CUDA events around every iteration, median over iterations; on CPU a host clock does the same.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Per-iteration marks: CUDA events on GPU (asynchronous), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def deltas_ms(self) -> list[float]:
        sync(self.device)
        if self.device.type == "cuda":
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median / spread of ``step()`` wall time in ms after ``warmup`` untimed calls (their wall
    time, compilation included, is ``warmup_s``)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    clock = StepClock(device)
    clock.mark()
    for _ in range(iters):
        step()
        clock.mark()
    return summarize(clock.deltas_ms()) | {"warmup_s": warmup_s}


def summarize(deltas: list[float]) -> dict[str, float]:
    deltas = sorted(deltas)
    return {"ms": statistics.median(deltas), "ms_min": deltas[0], "ms_max": deltas[-1], "iters": len(deltas)}


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` as torch.utils.flop_counter counts them (matmul/conv/attention)."""
    return counted_call(fn)[0]


# Above this batch a step's FLOPs are fitted, not counted whole: the eager step under the counter
# needs more memory than the compiled one that is timed (H100, 80 GB: batch 64 ran out), and two
# small batches count in seconds what one large one counts in a minute. Every row, icp's and the
# peers', is counted this way.
FLOP_COUNT_MAX_BATCH = 8


def count_flops_fitted(step_at: Callable[[int], Callable[[], Any]], batch: int,
                       cap: int = FLOP_COUNT_MAX_BATCH) -> float:
    """FLOPs of one ``step_at(batch)()``. Up to ``cap`` counted directly; above it fitted as
    ``F(cap) + (batch - cap) * slope`` from counts at cap/2 and cap: every op the counter counts
    (matmul, convolution, attention) is linear in the batch. An uncounted call at batch 1 first
    fills one-off caches (the task's text-encoder states for a prompt), which would bend the fit;
    that one-off encode is thus left out above ``cap`` (~0.01% of a 64-sample step)."""
    if batch <= cap:
        return count_flops(step_at(batch))
    step_at(1)()
    lo, hi = cap // 2, cap
    f_lo, f_hi = count_flops(step_at(lo)), count_flops(step_at(hi))
    return f_hi + (batch - hi) * (f_hi - f_lo) / (hi - lo)


def counted_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(FLOPs, result) of one call of ``fn``."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


def rel_l1(value: torch.Tensor, ref: torch.Tensor) -> float:
    """mean |value - ref| / mean |ref|: how far one run's images are from another's."""
    return float((value - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12))


def error_line(err: Exception, limit: int = 300) -> str:
    """``Type: first line of the message`` (cut to ``limit``) for the table's failed-row list."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return float("nan")


def matmul_peak_tflops(device: torch.device, size: int = 8192, iters: int = 20) -> float:
    """Measured bf16 dense matmul rate (TFLOP/s) on random data: the MFU denominator."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    # Several operand sets so repeated products do not just re-read one cached pair.
    a = [torch.randn(size, size, device=device, dtype=dtype, generator=gen) for _ in range(3)]
    b = [torch.randn(size, size, device=device, dtype=dtype, generator=gen) for _ in range(3)]
    out = torch.empty(size, size, device=device, dtype=dtype)
    k = [0]

    def step():
        i = k[0] % 3
        torch.mm(a[i], b[(i + 1) % 3], out=out)
        k[0] += 1

    timing = time_steps(step, device, warmup=5, iters=iters)
    return 2 * size**3 / (timing["ms"] * 1e-3) / 1e12


@dataclass
class Result:
    """One row of the table."""

    name: str
    section: str
    samples_per_step: int
    ms: float
    flops_per_step: float
    peak_gib: float
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.samples_per_step / (self.ms * 1e-3)

    @property
    def tflops(self) -> float:
        return self.flops_per_step / (self.ms * 1e-3) / 1e12

    def row(self, peak_tflops: float, baseline: "Result | None") -> dict[str, Any]:
        ratio = self.samples_per_s / baseline.samples_per_s if baseline is not None else float("nan")
        return {"name": self.name, "section": self.section, "samples_per_s": self.samples_per_s,
                "gflop_per_sample": self.flops_per_step / max(1, self.samples_per_step) / 1e9,
                "tflops": self.tflops, "mfu": self.tflops / peak_tflops if peak_tflops else float("nan"),
                "peak_gib": self.peak_gib, "ms_per_step": self.ms, "batch": self.samples_per_step,
                "vs_baseline": ratio, "settings": self.settings, **self.extra}


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import lightning

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "lightning": lightning.__version__,
           "python": platform.python_version(), "device": str(device), "cpu_count": _cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sms=props.multi_processor_count, gpu_mem_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
