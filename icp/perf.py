"""Performance switches: pure functions and context managers, each kept only where measured to pay.

Numbers behind every default are in eval/results/bench_train.md (made by eval/bench_train.py on
an H100); the reasons are in docs/decisions/performance.md. Nothing here changes *what* is
computed, only in which precision / memory layout / kernel; tests/test_perf.py checks each switch
against the plain path on CPU (loss within bf16 tolerance).

- :func:`bf16_frozen`     -- frozen parts (VAE, text encoder, frozen generation UNet) stored in
                             bf16: no per-step fp32->bf16 weight casts under autocast, half the
                             weight memory, no grads kept for them;
- :func:`channels_last`   -- NHWC memory format for conv nets (cuDNN's fast layout on tensor cores);
- :func:`sdpa_backend` / :func:`set_sdpa_backend` -- choose the attention kernel (flash, cudnn, ...);
- :func:`compile_module`  -- torch.compile, whole module or "regional" (each repeated ResNet /
                             transformer block compiled once: fuses GroupNorm+SiLU, compiles fast);
- :func:`graphed`         -- CUDA-graph capture of a fixed-shape inference call (sampling loops);
- :func:`memoize_text`    -- cache the frozen text encoder's states of repeated prompts;
- :func:`configure_task`  -- the one call a task makes to apply the configured switches.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
from torch import nn

from icp.errors import ConfigError

SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
COMPILE_MODES = (None, "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Blocks that repeat through the SD UNet / ControlNet / VAE: compiling these "regionally" gives the
# GroupNorm+SiLU+conv fusions of a whole-model compile at a fraction of the compile time.
REGIONAL_BLOCKS = ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock")


# ------------------------------------------------------------------------------ precision


def bf16_frozen(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Freeze ``module`` and store its floating-point weights in ``dtype`` (in place; returns it).

    Only for modules that never train. Under bf16 autocast the result is the same computation
    (autocast casts fp32 weights to bf16 anyway, every step); without autocast, callers must feed
    inputs of ``dtype`` (the codec and task wrappers in icp do).
    """
    module.requires_grad_(False)
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for buf_name, buf in list(module.named_buffers()):
        # Buffers such as position ids are integers; only cast floating ones.
        if buf.is_floating_point() and buf.dtype != dtype:
            owner = module.get_submodule(buf_name.rsplit(".", 1)[0]) if "." in buf_name else module
            owner._buffers[buf_name.rsplit(".", 1)[-1]] = buf.to(dtype)
    return module


def frozen_children(module: nn.Module) -> list[nn.Module]:
    """Largest submodules of ``module`` whose parameters are all frozen (none trainable)."""
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(m)
            return
        for child in m.children():
            visit(child)

    visit(module)
    return out


# ------------------------------------------------------------------------------ memory layout


def channels_last(module: nn.Module) -> nn.Module:
    """4-D weights in NHWC (channels-last) layout, in place; returns the module."""
    return module.to(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------ attention kernels


def _backends(name: str) -> list:
    from torch.nn.attention import SDPBackend

    if name not in SDPA_BACKENDS:
        raise ConfigError(f"perf.sdpa='{name}' is not one of {', '.join(SDPA_BACKENDS)}")
    table = {"flash": [SDPBackend.FLASH_ATTENTION], "efficient": [SDPBackend.EFFICIENT_ATTENTION],
             "cudnn": [SDPBackend.CUDNN_ATTENTION], "math": [SDPBackend.MATH]}
    if name == "auto":
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
    # The math kernel stays as a fallback for shapes/devices the fast one rejects (e.g. CPU).
    return table[name] + ([SDPBackend.MATH] if name != "math" else [])


@contextlib.contextmanager
def sdpa_backend(name: str = "auto"):
    """Restrict ``scaled_dot_product_attention`` to one kernel family inside the block."""
    from torch.nn.attention import sdpa_kernel

    if name == "auto":
        yield
        return
    with sdpa_kernel(_backends(name)):
        yield


def set_sdpa_backend(name: str = "auto") -> None:
    """Process-wide version of :func:`sdpa_backend` (Lightning runs the step outside our scope)."""
    _backends(name)  # validates
    allow = {"flash": name in ("auto", "flash"), "efficient": name in ("auto", "efficient"),
             "cudnn": name in ("auto", "cudnn"), "math": True}
    torch.backends.cuda.enable_flash_sdp(allow["flash"])
    torch.backends.cuda.enable_mem_efficient_sdp(allow["efficient"])
    torch.backends.cuda.enable_cudnn_sdp(allow["cudnn"])
    torch.backends.cuda.enable_math_sdp(allow["math"])


# ------------------------------------------------------------------------------ compilation


def compile_module(module: nn.Module, mode: str | None = "default", regional: bool = True,
                   backend: str = "inductor", blocks: Iterable[str] = REGIONAL_BLOCKS) -> int:
    """torch.compile ``module`` in place; returns how many (sub)modules were compiled.

    ``regional=True`` compiles each repeated block (``blocks`` by class name) instead of the whole
    model: the SD UNet's blocks share code, so compile time is a few graphs instead of one huge
    one, and a graph break in glue code costs nothing. ``mode`` None/"none" is a no-op.
    """
    if mode not in COMPILE_MODES:
        raise ConfigError(f"perf.compile='{mode}' is not one of {', '.join(str(m) for m in COMPILE_MODES)}")
    if mode in (None, "none"):
        return 0
    import torch._dynamo

    # Many block shapes (320/640/1280 channels x 4 resolutions) share one forward: without a
    # larger cache dynamo would fall back to eager after 8 of them.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 4096)
    kwargs: dict[str, Any] = {"backend": backend, "dynamic": False}
    if backend == "inductor":
        kwargs["mode"] = mode
    if not regional:
        module.compile(**kwargs)
        return 1
    names = set(blocks)
    count = 0
    for sub in module.modules():
        if type(sub).__name__ in names and not getattr(sub, "_icp_compiled", False):
            sub.compile(**kwargs)
            sub._icp_compiled = True
            count += 1
            # Do not also compile the blocks nested inside a compiled block.
            for inner in sub.modules():
                inner._icp_compiled = True
    return count


# ------------------------------------------------------------------------------ CUDA graphs


def graphed(fn: Callable[..., torch.Tensor], *example: torch.Tensor, warmup: int = 2) -> Callable[..., torch.Tensor]:
    """Capture ``fn(*example)`` (no grad, fixed shapes) in a CUDA graph; returns a replaying callable.

    The callable copies its tensor arguments into the captured inputs and replays: the per-kernel
    launch cost of a sampling loop's many small kernels disappears. The returned output tensor is
    reused by every call (clone it to keep it). Off CUDA, returns ``fn`` unchanged.
    """
    if not example or not all(isinstance(t, torch.Tensor) for t in example) or not example[0].is_cuda:
        return fn
    static_in = [t.clone() for t in example]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(warmup):  # let cuDNN/cuBLAS pick algorithms and allocate workspaces first
            fn(*static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = fn(*static_in)

    def replay(*args: torch.Tensor) -> torch.Tensor:
        for dst, src in zip(static_in, args):
            dst.copy_(src)
        graph.replay()
        return static_out

    replay.graph = graph  # keep the graph (and its memory pool) alive with the callable
    return replay


# ------------------------------------------------------------------------------ task wiring


def configure_task(task: nn.Module, bf16_frozen_weights: bool = True, channels_last_layout: bool = False,
                   compile: str | None = "default", compile_regional: bool = True, sdpa: str = "auto",
                   memo_text: bool = True, precision: str | None = None) -> dict[str, Any]:
    """Apply the switches to a task (a LightningModule holding ``backbone`` and control nets).

    Call once, after the trainable parts are decided (requires_grad set) and before the
    optimizer is built, e.g. at the start of ``DiffusionTask.setup``. ``precision`` is the
    trainer's precision string: bf16 frozen weights need a bf16 autocast ("bf16-mixed") since
    fp32 activations would otherwise meet bf16 weights. Returns what was applied.
    """
    applied: dict[str, Any] = {"bf16_frozen": 0, "channels_last": False, "compiled": 0, "sdpa": sdpa}
    if bf16_frozen_weights and (precision is None or str(precision).startswith("bf16")):
        for part in frozen_children(task):
            bf16_frozen(part)
            applied["bf16_frozen"] += sum(p.numel() for p in part.parameters())
    if channels_last_layout:
        channels_last(task)
        applied["channels_last"] = True
    set_sdpa_backend(sdpa)
    if memo_text and getattr(task, "backbone", None) is not None:
        memoize_text(task.backbone)
        applied["memo_text"] = True
    # Compile only where Triton/inductor pays (CUDA): on CPU (tests, CI) it costs minutes of
    # C++ compilation for nothing measured.
    if not torch.cuda.is_available():
        compile = None
    for part in _compile_targets(task):
        applied["compiled"] += compile_module(part, compile, regional=compile_regional)
    return applied


def _compile_targets(task: nn.Module) -> list[nn.Module]:
    """The conv nets worth compiling: the UNet, control nets and the codec (never the tokenizer)."""
    backbone = getattr(task, "backbone", None)
    targets = [m for m in (getattr(backbone, "unet", None), getattr(backbone, "codec", None)) if m is not None]
    seen = {id(m) for m in targets}
    for module in task.modules():
        if type(module).__name__ == "ControlUNet" and id(module) not in seen:
            targets.append(module)
            seen.add(id(module))
    return targets


# ------------------------------------------------------------------------------ text cache


def memoize_text(backbone: nn.Module, max_entries: int = 16) -> nn.Module:
    """Cache ``backbone.encode_text`` for a frozen text encoder (in place; returns the backbone).

    Tasks re-encode the same default prompt and the empty CFG prompt every step; with a frozen
    encoder the states never change, so two text-encoder passes and two tokenisations per step
    become dictionary look-ups. A trainable encoder bypasses the cache.
    """
    from collections import OrderedDict

    original = backbone.encode_text
    cache: OrderedDict = OrderedDict()

    def encode_text(prompts: list[str]) -> torch.Tensor:
        encoder = backbone.text_encoder
        first = next(encoder.parameters())
        if any(p.requires_grad for p in encoder.parameters()):
            return original(prompts)
        key = (tuple(prompts), first.device, first.dtype, torch.is_autocast_enabled(first.device.type))
        if key not in cache:
            cache[key] = original(prompts).detach()
            if len(cache) > max_entries:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    backbone.encode_text = encode_text
    return backbone
