"""The switches applied to a task: :func:`configure_task` for training (once, in
``DiffusionTask.setup``), :func:`configure_inference` for a task that only samples
(``DiffusionTask.prepare_inference``, called by ``icp.tasks.loading.load_task``). The sampling-side
switches (batched CFG, the sampling graph, bf16 autocast) are read by ``sample()`` itself."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from icp.perf.compile import compile_module, compile_plan, inductor_options
from icp.perf.kernels import bf16_frozen, channels_last, frozen_children, set_sdpa_backend, store_in, wide_head_attention
from icp.perf.switches import settings, use_channels_last


def configure_task(task: nn.Module, perf: Mapping[str, Any] | None = None, precision: str | None = None,
                   device: torch.device | str | None = None) -> dict[str, Any]:
    """Apply the training-side switches of ``perf`` (see ``settings``) to a task, in place.

    Call once, after the trainable parts are decided (requires_grad set) and before the
    optimizer is built (``DiffusionTask.setup``). ``precision``: the trainer's precision string;
    bf16 frozen weights need a bf16 autocast ("bf16-mixed"), since fp32 activations would
    otherwise meet bf16 weights (None = unknown: weights stay as they are). ``device``: where the
    task will run (default: where its parameters are); compilation happens only for CUDA.
    Returns what was applied.
    """
    s = settings(perf)
    applied: dict[str, Any] = {"bf16_frozen": 0, "channels_last": False, "compiled": 0, "sdpa": s["sdpa"]}
    if s["bf16_frozen"] and precision is not None and str(precision).startswith("bf16"):
        for part in frozen_children(task):
            bf16_frozen(part)
            applied["bf16_frozen"] += sum(p.numel() for p in part.parameters())
    _layout_kernels_compile(task, s, _device_of(task, device), applied)
    return applied


def configure_inference(task: nn.Module, perf: Mapping[str, Any] | None = None,
                        device: torch.device | str | None = None, bf16: bool | None = None,
                        compile: bool = True) -> dict[str, Any]:
    """Apply the switches of ``perf`` to a task that will only sample (evaluation), in place.

    Nothing trains there, so ``bf16_frozen`` covers *every* floating weight: with it and
    ``sample_bf16`` on CUDA all weights are stored in bf16 (``sample()`` autocasts to bf16
    there anyway, so convs and matmuls see the same bf16 weights, minus a cast per call).
    ``bf16`` forces that choice (tests on CPU). Then the SDPA kernel and compilation, as
    :func:`configure_task` does for training. ``requires_grad`` is left as it is: the task's EMA
    bookkeeping selects trained weights by it, and sampling runs under no_grad. ``compile=False``
    skips compilation (a few images do not repay its ~2 minutes). Returns what was applied
    (``inference: True``).
    """
    s = settings(perf)
    device = _device_of(task, device)
    if bf16 is None:
        bf16 = bool(s["bf16_frozen"] and s["sample_bf16"] and device.type == "cuda")
    applied: dict[str, Any] = {"bf16_frozen": 0, "channels_last": False, "compiled": 0, "sdpa": s["sdpa"],
                               "inference": True}
    if bf16:
        applied["bf16_frozen"] = store_in(task, torch.bfloat16)
    _layout_kernels_compile(task, s, device, applied, compile=compile)
    return applied


def _device_of(task: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device``, or where the task's parameters are."""
    if device is None:
        first = next(task.parameters(), None)
        device = first.device if first is not None else "cpu"
    return torch.device(device)


def _layout_kernels_compile(task: nn.Module, s: Mapping[str, Any], device: torch.device,
                            applied: dict[str, Any], compile: bool = True) -> None:
    """The switches training and evaluation share: NHWC, the SDPA kernel, torch.compile."""
    if use_channels_last(s if compile else {**s, "compile": "none"}, device):
        channels_last(task)
        applied["channels_last"] = True
    set_sdpa_backend(s["sdpa"])
    # The matmul path for wide heads was measured on CUDA only (docs/history/performance.md); CPU keeps SDPA.
    applied["wide_heads"] = wide_head_attention(task) if s["wide_heads_matmul"] and device.type == "cuda" else 0
    # Compile only where Triton/inductor pays (CUDA): on CPU (tests, CI) it costs minutes of
    # C++ compilation for nothing measured.
    if compile and device.type == "cuda":
        options = inductor_options(s)
        for net, regional in compile_plan(task, s):
            applied["compiled"] += compile_module(net, s["compile"], regional=regional, options=options)
