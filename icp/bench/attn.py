"""Attention kernels alone at the SD1.5 shapes of the benchmark's steps (row ``attn``).

Seconds instead of a compiled step per candidate: which SDPA kernel (and whether zero-padding
the 40-wide heads to 64, an exact rewrite with the scale kept) pays for the training steps
(forward + backward) and for sampling (forward), and whether the VAE's one 512-wide head runs
faster as matmul + softmax (``icp.perf.WideHeadAttention``) than on the memory-efficient kernel
SDPA falls back to. Each case is one Result: ms per call, FLOPs by the counter.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from icp import perf

from . import common

# (name, batch * heads, tokens, head dim, backward?): (b) at batch 48 and (c)'s canvas at 16 train;
# sampling runs the UNet on 2 x 8 (batched CFG) and the stitching control net on 8 canvases.
TRAIN_CASES = [("unet64_bs48", 48 * 8, 4096, 40, True), ("canvas_bs16", 16 * 8, 8192, 40, True)]
SAMPLE_CASES = [("unet64_cfg16", 16 * 8, 4096, 40, False), ("canvas_bs8", 8 * 8, 8192, 40, False)]
TINY = {"unet64_bs48": (2 * 8, 64, 40), "canvas_bs16": (2 * 8, 128, 40), "unet64_cfg16": (2 * 8, 64, 40),
        "canvas_bs8": (8, 128, 40)}
KERNELS = ("auto", "cudnn", "flash", "efficient")


def _sdpa(q, k, v, kernel: str, pad: int, scale: float) -> torch.Tensor:
    d = q.shape[-1]
    if pad:
        # Zero columns add nothing to q.k, and the output's extra columns (from zero v) are cut.
        q, k, v = (F.pad(t, (0, pad - d)) for t in (q, k, v))
    with perf.sdpa_backend(kernel):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out[..., :d] if pad else out


def _case_fn(bh, n, d, backward, kernel, pad, device) -> Callable[[], None]:
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(bh // 8, 8, n, d, device=device, dtype=dtype, generator=gen, requires_grad=backward)
               for _ in range(3))
    grad = torch.randn(bh // 8, 8, n, d, device=device, dtype=dtype, generator=gen)
    scale = d ** -0.5

    def step():
        out = _sdpa(q, k, v, kernel, pad, scale)
        if backward:
            out.backward(grad)
    return step


def run(bench) -> None:
    """Time every case x kernel (and x padding to 64) on ``bench.device``; records Results."""
    device, tiny = bench.device, bench.tiny
    for name, bh, n, d, backward in TRAIN_CASES + SAMPLE_CASES:
        if tiny:
            bh, n, d = TINY[name]
        for kernel in KERNELS if device.type == "cuda" else ("auto",):
            for pad in (0, 64):
                label = f"attn_{name}_{kernel}" + (f"_pad{pad}" if pad else "")
                settings = {"heads_x_batch": bh, "tokens": n, "head_dim": d, "backward": backward,
                            "kernel": kernel, "pad_to": pad}
                _guard(bench, label, lambda: _time(bench, label, _case_fn(bh, n, d, backward, kernel, pad, device),
                                                   settings))
    _vae(bench)


def _guard(bench, label: str, fn: Callable[[], None]) -> None:
    """One case failing (a kernel that rejects a shape) must not lose the others."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001
        bench.errors[label] = common.error_line(err, limit=200)
        print(f"{label}: {bench.errors[label]}", flush=True)


def _time(bench, label, step, settings, flops: float | None = None, warmup: int = 3, iters: int = 20) -> None:
    # FLOPs of an eager call (the counter would leave a compiled function eager for good).
    flops = common.count_flops(step) if flops is None else flops
    common.reset_memory(bench.device)
    timing = common.time_steps(step, bench.device, warmup, iters)
    bench.record(label, "attn", 1, timing, flops, settings)


def _vae(bench) -> None:
    """The VAE encoder's mid-block attention (512-wide head, 64x64 tokens at 512 px), batch 16 as
    in (c): SDPA (the memory-efficient kernel) vs the matmul processor, eager and compiled."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from icp.models import backbone as bb

    device = bench.device
    with torch.device(device):
        codec = bb.tiny(resolution=32, width=32, codec="vae").codec if bench.tiny else bench.backbone().codec
    attn = next(m for m in codec.modules() if type(m).__name__ == "Attention")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    perf.store_in(attn.requires_grad_(False), dtype)
    side, batch = (8, 2) if bench.tiny else (64, 16)
    x = torch.randn(batch, attn.inner_dim, side, side, device=device, dtype=dtype)
    flops, ref = common.counted_call(lambda: attn(x))
    cases = [("sdpa", AttnProcessor2_0, False), ("matmul", perf.WideHeadAttention, False)]
    if device.type == "cuda":
        cases += [("matmul_compiled", perf.WideHeadAttention, True), ("sdpa_compiled", AttnProcessor2_0, True)]
    for label, processor, compiled in cases:
        def case(label=label, processor=processor, compiled=compiled):
            attn.set_processor(processor())
            fn = torch.compile(attn) if compiled else attn
            with torch.no_grad():
                out = fn(x)
                diff = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
                _time(bench, f"attn_vae_{label}", lambda: fn(x),
                      {"batch": batch, "tokens": side * side, "head_dim": attn.inner_dim // attn.heads,
                       "processor": label, "compiled": compiled, "max_rel_diff_vs_sdpa": diff}, flops)
        _guard(bench, f"attn_vae_{label}", case)
    del codec
