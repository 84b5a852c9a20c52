"""Performance switches of the training tasks (issue 9): one config node, ``model.perf``.

A task takes ``perf`` as a plain mapping (YAML ``model.perf``); :func:`settings` merges it over
:data:`DEFAULTS` and checks it; :func:`configure_task` applies the training-side switches once
(``DiffusionTask.setup``); the task reads the sampling-side ones in ``sample()``. Nothing here
changes *what* is computed, only in which precision / memory layout / kernel / batching;
tests/test_perf.py checks every switch against the plain path on CPU.

=====================  =========  ===================================================================
key                    default    what
=====================  =========  ===================================================================
bf16_frozen            true       frozen parts (codec, text encoder, frozen UNet / control nets)
                                  stored in bf16 without grads -- only under a bf16 trainer precision
compile                default    torch.compile mode for the UNet, control nets, codec and glue modules
                                  (adaptation's fusion and matching, compiled whole); CUDA only
                                  (on CPU the C++ compile costs minutes for nothing measured); none=off
compile_regional       true       compile each repeated ResNet / transformer block, not whole nets
compile_dynamic        false      symbolic shapes (one graph for many block sizes: shorter compile)
sdpa                   auto       attention kernel family (auto = cuDNN on H100, the fastest measured)
channels_last          auto       NHWC weights; auto = only where compiled on CUDA (pays there: +1-4%;
                                  eager GroupNorm in NHWC is slower: 0.92x)
fused_optimizer        true       fused AdamW/Adam on CUDA unless the optimizer node sets fused/foreach
batched_cfg            true       sample(): cond + uncond in one UNet call (uncond = zero residuals)
cuda_graph_sampling    true       sample(): the guided prediction of a step replayed as a CUDA graph
                                  (an evaluation task keeps it across calls of the same shapes)
sample_bf16            true       sample() outside a bf16 trainer autocasts to bf16 on CUDA; with
                                  bf16_frozen, evaluation (configure_inference) stores all weights in bf16
wide_heads_matmul      true       attention heads wider than the fused SDPA kernels take (the VAE's one
                                  512-wide head) as matmul + softmax, batch-chunked; CUDA only
fuse_qkv               false      evaluation only: q/k/v (self-) and k/v (cross-attention) projections
                                  as one GEMM (diffusers' fuse_projections); training keeps them apart
compile_codec_whole    true       compile the codec's encoder and decoder whole instead of by block (no
                                  eager convs, pads and bias adds between VAE blocks); H200: (c)
                                  adaptation +2.4%, (d) +0.4% and 2.2 GiB less
force_layout_opt       true       inductor lays every compiled graph's intermediates out channels-last
                                  (its heuristics skip backward graphs and the up-block ResNets);
                                  H200: (b) +3.2%
cudnn_benchmark        false      cuDNN times every algorithm of each new conv shape once and keeps the
                                  fastest (torch.backends.cudnn.benchmark, process-wide); CUDA only;
                                  off leaves the flag as the trainer (``trainer.benchmark``) set it
foreach_ema            false      the EMA of the trained weights (model.ema_decay > 0) steps with
                                  multi-tensor kernels (diffusers' EMAModel(foreach=True): a few
                                  launches instead of 3 per tensor, one temporary copy of the weights)
lagged_progress_loss   false      CUDA: the progress bar shows the previous step's loss, read without
                                  waiting (Lightning turns progress-bar values into numbers at every
                                  batch end: a wait for the whole step); logged metrics stay exact
train                  {}         switches over the above for training runs only (their validation
                                  samples too), e.g. {compile: reduce-overhead, compile_regional:
                                  false}: H200 (b) at batch 64 1.47x, whole without graphs 1.46x
                                  (same run), by block 1.43x (round 4); evaluation keeps the top
                                  level (by block, sampling is 1.15x a whole compile's speed)
=====================  =========  ===================================================================

The figures behind every default are in eval/results/bench_train*.md (eval/bench_train.py on an
H100) and the reasons in docs/decisions/performance.md. :data:`OFF` is the plain path: what a
task did before these switches existed (the benchmark's "settings off" rows).
:func:`configure_inference` is the evaluation counterpart of :func:`configure_task`
(``icp.tasks.loading.load_task`` calls it through ``DiffusionTask.prepare_inference``).

Building blocks, usable on their own: :func:`bf16_frozen`, :func:`channels_last`,
:func:`sdpa_backend` / :func:`set_sdpa_backend`, :func:`compile_module` (with
:func:`compile_plan`: what a task's switches compile, by block or whole, and
:func:`inductor_options`), :class:`GraphedStep` (a call replayed from a CUDA graph after warm-up
calls), :func:`fused_optimizer`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from icp.core.errors import ConfigError

log = logging.getLogger(__name__)

SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
COMPILE_MODES = (None, "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Blocks that repeat through the SD UNet / ControlNet / VAE: compiling these "regionally" gives the
# GroupNorm+SiLU+conv fusions of a whole-model compile at a fraction of the compile time.
# "Attention" catches the attention blocks outside transformer blocks (the VAE's mid blocks); the
# ones inside a compiled transformer block are compiled with it.
REGIONAL_BLOCKS = ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock", "Attention")

DEFAULTS: dict[str, Any] = {
    "bf16_frozen": True, "compile": "default", "compile_regional": True, "compile_dynamic": False,
    "sdpa": "auto", "channels_last": "auto", "fused_optimizer": True, "batched_cfg": True,
    "cuda_graph_sampling": True, "sample_bf16": True, "wide_heads_matmul": True, "fuse_qkv": False,
    "cudnn_benchmark": False, "compile_codec_whole": True, "force_layout_opt": True, "foreach_ema": False,
    "lagged_progress_loss": False,
    # Training runs only: the whole nets under inductor's CUDA graphs (H100, round 7: (b) 1.49x ->
    # 1.51-1.53x, (c) 41.0-41.4% MFU at batch 32); evaluation keeps by-block graphs and its own
    # sampling graph (1.15x a whole compile there). Dropped to compile=default where gradients
    # accumulate (guard_accumulation).
    "train": {"compile": "reduce-overhead", "compile_regional": False},
}
OFF: dict[str, Any] = {
    "bf16_frozen": False, "compile": "none", "compile_regional": True, "compile_dynamic": False,
    "sdpa": "auto", "channels_last": False, "fused_optimizer": False, "batched_cfg": False,
    "cuda_graph_sampling": False, "sample_bf16": False, "wide_heads_matmul": False, "fuse_qkv": False,
    "cudnn_benchmark": False, "compile_codec_whole": False, "force_layout_opt": False, "foreach_ema": False,
    "lagged_progress_loss": False, "train": {},
}


def settings(node: Mapping[str, Any] | None = None, where: str = "model.perf") -> dict[str, Any]:
    """``node`` merged over :data:`DEFAULTS`, checked: unknown keys and bad values are ConfigErrors.

    ``train`` (a mapping of the other switches) overrides them in a training run only
    (:func:`training_settings`); evaluation (:func:`configure_inference`) uses the top level."""
    node = dict(node or {})
    unknown = sorted(set(node) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a performance switch; known: {', '.join(DEFAULTS)}")
    # A given ``train`` replaces the default one (``train: {}``: no training override).
    train = node.pop("train") if "train" in node else DEFAULTS["train"]
    train = {} if train is None else train
    if not isinstance(train, Mapping):
        raise ConfigError(f"{where}.train={train!r} must be a mapping of switches (e.g. {{compile: reduce-overhead}})")
    out = _checked({**DEFAULTS, **node, "train": {}}, where)
    if train:
        bad = sorted(set(train) - (set(DEFAULTS) - {"train"}))  # a nested "train" too
        if bad:
            raise ConfigError(f"{where}.train.{bad[0]} is not a performance switch; known: "
                              f"{', '.join(k for k in DEFAULTS if k != 'train')}")
        merged = _checked({**out, **dict(train)}, f"{where}.train")
        out["train"] = {key: merged[key] for key in train}
    return out


def _checked(out: dict[str, Any], where: str) -> dict[str, Any]:
    if out["compile"] is False:  # YAML `compile: false` reads as off
        out["compile"] = "none"
    if out["compile"] not in COMPILE_MODES:
        raise ConfigError(f"{where}.compile='{out['compile']}' is not one of "
                          f"{', '.join(str(m) for m in COMPILE_MODES)}")
    if out["sdpa"] not in SDPA_BACKENDS:
        raise ConfigError(f"{where}.sdpa='{out['sdpa']}' is not one of {', '.join(SDPA_BACKENDS)}")
    for key, value in out.items():
        if key == "train" or (key == "channels_last" and value == "auto"):
            continue
        if key not in ("compile", "sdpa") and not isinstance(value, bool):
            extra = ", or auto" if key == "channels_last" else ""
            raise ConfigError(f"{where}.{key}={value!r} must be true or false{extra}")
    return out


def training_settings(s: Mapping[str, Any]) -> dict[str, Any]:
    """Checked settings (:func:`settings`) as a training run uses them: ``train`` applied over
    the top level (e.g. the whole UNet under inductor's CUDA graphs for the training step, while
    evaluation keeps by-block graphs and its own sampling graph)."""
    return {**s, **s.get("train", {})}


def use_channels_last(s: Mapping[str, Any], device: torch.device | str) -> bool:
    """``channels_last`` resolved for a device: ``auto`` = where the nets are compiled (CUDA and
    ``compile`` on); measured: +1-4% under compile on Hopper, 0.92x eager (slow NHWC GroupNorm)."""
    value = s["channels_last"]
    if value == "auto":
        return torch.device(device).type == "cuda" and s["compile"] not in (None, "none")
    return bool(value)


# ------------------------------------------------------------------------------ precision


def bf16_frozen(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Freeze ``module`` and store its floating-point weights in ``dtype`` (in place; returns it).

    Only for modules that never train. Under bf16 autocast the result is the same computation
    (autocast casts fp32 weights to bf16 anyway, every step); without autocast, callers must feed
    inputs of ``dtype`` (the codec does; DiffusionTask.sample autocasts).
    """
    module.requires_grad_(False)
    store_in(module, dtype)
    return module


def store_in(module: nn.Module, dtype: torch.dtype) -> int:
    """Floating-point parameters and buffers of ``module`` stored in ``dtype``, in place
    (``requires_grad`` untouched); returns how many floating-point parameter elements it holds."""
    count = 0
    for param in module.parameters():
        if param.is_floating_point():
            count += param.numel()
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
    for buf_name, buf in list(module.named_buffers()):
        # Buffers such as position ids are integers; only cast floating ones.
        if buf.is_floating_point() and buf.dtype != dtype:
            owner = module.get_submodule(buf_name.rsplit(".", 1)[0]) if "." in buf_name else module
            owner._buffers[buf_name.rsplit(".", 1)[-1]] = buf.to(dtype)
    return count


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


# Widest head the fused SDPA kernels (flash, cuDNN) take: a wider one (the SD VAE's single 512-wide
# head) falls back to the memory-efficient kernel, which runs it at a fraction of the matmul rate.
FUSED_HEAD_LIMIT = 256
# Attention-score elements per matmul-path call: eager fp32 softmax holds ~12 bytes of each
# (scores, upcast, probabilities), so this bounds the transient at ~3 GiB; larger batches are
# chunked, and a single sample above it (a 1024-px VAE decode) keeps the SDPA kernel.
MATMUL_SCORES_LIMIT = 2**28


class WideHeadAttention:
    """diffusers attention processor for heads wider than :data:`FUSED_HEAD_LIMIT`.

    Runs diffusers' own matmul processor (``AttnProcessor``: scores by ``baddbmm``, fp32 softmax
    when the module upcasts, ``bmm``) over batch chunks of at most ``max_scores`` score elements,
    and diffusers' SDPA processor where one sample alone is larger or a mask / temb is given.
    Every op is per sample, so chunking over the batch gives the same result.
    """

    def __init__(self, max_scores: int = MATMUL_SCORES_LIMIT):
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        self.matmul, self.sdpa, self.max_scores = AttnProcessor(), AttnProcessor2_0(), int(max_scores)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs
                 ) -> torch.Tensor:
        queries = math.prod(hidden_states.shape[2:]) if hidden_states.ndim == 4 else hidden_states.shape[1]
        keys = queries if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        per_sample = attn.heads * queries * keys
        if per_sample > self.max_scores or attention_mask is not None or temb is not None:
            return self.sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        step = max(1, self.max_scores // per_sample)
        parts = [self.matmul(attn, hidden_states[i:i + step],
                             None if encoder_hidden_states is None else encoder_hidden_states[i:i + step])
                 for i in range(0, hidden_states.shape[0], step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _default_attention(module: nn.Module) -> list[nn.Module]:
    """diffusers ``Attention`` modules of ``module`` still on the default SDPA processor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    return [m for m in module.modules() if isinstance(m, Attention) and type(m.processor) is AttnProcessor2_0]


def _head_dim(attn: nn.Module) -> int:
    return attn.inner_dim // attn.heads


def wide_head_attention(module: nn.Module, limit: int = FUSED_HEAD_LIMIT,
                        max_scores: int = MATMUL_SCORES_LIMIT) -> int:
    """Attention blocks of ``module`` with heads wider than ``limit`` on :class:`WideHeadAttention`
    (in place); returns how many."""
    wide = [m for m in _default_attention(module) if _head_dim(m) > limit]
    for attn in wide:
        attn.set_processor(WideHeadAttention(max_scores))
    return len(wide)


def fuse_qkv(module: nn.Module) -> int:
    """Self-attention q/k/v and cross-attention k/v projections of ``module`` as one linear layer
    each (diffusers' ``Attention.fuse_projections`` + ``FusedAttnProcessor2_0``), in place; for
    modules that only sample. Only blocks on the default processor with the default 1/sqrt(head)
    scale (the fused processor does not pass a scale). The unfused layers stay (state-dict keys
    are kept, plus the fused ones). Returns how many blocks were fused."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    count = 0
    for attn in _default_attention(module):
        if _head_dim(attn) > FUSED_HEAD_LIMIT or not math.isclose(attn.scale, _head_dim(attn) ** -0.5):
            continue
        attn.fuse_projections()
        attn.set_processor(FusedAttnProcessor2_0())
        count += 1
    return count


# ------------------------------------------------------------------------------ compilation


def compile_module(module: nn.Module, mode: str | None = "default", regional: bool = True,
                   backend: str = "inductor", blocks: Iterable[str] = REGIONAL_BLOCKS,
                   dynamic: bool = False, options: Mapping[str, Any] | None = None) -> int:
    """torch.compile ``module`` in place; returns how many (sub)modules were compiled.

    ``regional=True`` compiles each repeated block (``blocks`` by class name) instead of the whole
    model: the SD UNet's blocks share code, so compile time is a few graphs instead of one huge
    one, and a graph break in glue code costs nothing. ``mode`` None/"none" is a no-op.
    ``dynamic=True`` traces symbolic shapes: blocks that differ only in size share one graph.
    ``options``: inductor settings over those of ``mode`` (torch.compile takes one or the other).
    State-dict keys do not change (``nn.Module.compile`` compiles in place).
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
    kwargs: dict[str, Any] = {"backend": backend, "dynamic": bool(dynamic)}
    if backend == "inductor" and options:
        from torch._inductor import list_mode_options

        kwargs["options"] = {**list_mode_options(mode), **options}
    elif backend == "inductor":
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


class LaggedScalar:
    """A device scalar read one step late without waiting for the device.

    ``push(x)`` queues a copy of ``x`` into pinned host memory behind the work already queued and
    returns the value pushed before it (a CPU tensor), waiting only for that earlier copy, which
    is normally long done; the first push returns None. Off CUDA it returns ``x`` itself."""

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, Any] | None = None

    def push(self, value: torch.Tensor) -> torch.Tensor | None:
        value = value.detach()
        if value.device.type != "cuda":
            return value
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        previous, self._pending = self._pending, (host, done)
        if previous is None:
            return None
        previous[1].synchronize()
        return previous[0]


class GraphedStep:
    """``fn(*tensors) -> tensor`` that becomes a CUDA-graph replay after ``warmup`` real calls.

    For a loop calling ``fn`` with fixed shapes (a sampler's guided prediction): the first
    ``warmup`` calls run eagerly on a side stream, as CUDA graph capture requires (they are real
    steps, so no work is thrown away; compilation and cuDNN algorithm choice happen here); the
    next call captures ``fn`` once, and every call from then on copies its arguments into the
    captured inputs and replays. Each call returns a fresh tensor (schedulers may keep past
    predictions). Inputs that ``fn`` closes over must stay alive and in place for the loop.
    Off CUDA it just calls ``fn``; if capture fails (an op that waits for the host) it logs
    why once and stays eager. Under autocast, the autocast weight cache must be off
    (``torch.autocast(..., cache_enabled=False)``): cached casts would outlive the capture.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self._static_in: list[torch.Tensor] = []
        self._static_out: torch.Tensor | None = None
        self._side: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.failed or not args or not args[0].is_cuda:
            return self.fn(*args)
        if self.graph is None:
            if self.calls < self.warmup:
                self.calls += 1
                return self._side_call(args)
            if not self._capture(args):
                return self.fn(*args)
        for dst, src in zip(self._static_in, args):
            dst.copy_(src)
        self.graph.replay()
        return self._static_out.clone()

    def _side_call(self, args) -> torch.Tensor:
        main = torch.cuda.current_stream()
        self._side = self._side or torch.cuda.Stream()
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            out = self.fn(*args)
        main.wait_stream(self._side)
        out.record_stream(main)
        return out

    def _capture(self, args) -> bool:
        self._static_in = [a.clone() for a in args]
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads (a DataLoader's pin-memory thread while a training run
            # samples its grids) may keep using CUDA during the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.fn(*self._static_in)
        except Exception as err:  # noqa: BLE001 -- any capture failure: run eagerly instead
            self.failed = True
            log.warning("CUDA graph capture failed (%s: %s); sampling continues without it (set "
                        "model.perf.cuda_graph_sampling=false to skip the attempt)", type(err).__name__,
                        str(err).splitlines()[0][:200] if str(err) else "")
            return False
        self.graph, self._static_out = graph, out
        return True


# ------------------------------------------------------------------------------ optimizer


FUSABLE_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam)


def fused_optimizer(factory: Callable[..., torch.optim.Optimizer], params: list[torch.nn.Parameter]
                    ) -> Callable[..., torch.optim.Optimizer]:
    """``factory`` with ``fused=True`` where that is the same optimizer, only one kernel per step.

    Applies to ``functools.partial(AdamW | Adam, ...)`` (a ``_partial_: true`` config node) that
    chose neither ``fused`` nor ``foreach`` itself, when every parameter is a CUDA float tensor;
    anything else is returned unchanged.
    """
    if not params or not all(p.is_cuda and p.is_floating_point() for p in params):
        return factory
    if (isinstance(factory, functools.partial) and factory.func in FUSABLE_OPTIMIZERS
            and not {"fused", "foreach"} & set(factory.keywords)):
        return functools.partial(factory, fused=True)
    return factory


# ------------------------------------------------------------------------------ task wiring


def configure_task(task: nn.Module, perf: Mapping[str, Any] | None = None, precision: str | None = None,
                   device: torch.device | str | None = None) -> dict[str, Any]:
    """Apply the training-side switches of ``perf`` (see :func:`settings`) to a task, in place.

    Call once, after the trainable parts are decided (requires_grad set) and before the
    optimizer is built (``DiffusionTask.setup``). ``precision``: the trainer's precision string;
    bf16 frozen weights need a bf16 autocast ("bf16-mixed"), since fp32 activations would
    otherwise meet bf16 weights (None = unknown: weights stay as they are). ``device``: where the
    task will run (default: where its parameters are); compilation happens only for CUDA.
    Returns what was applied.
    """
    s = training_settings(settings(perf))
    applied: dict[str, Any] = {"bf16_frozen": 0, "channels_last": False, "compiled": 0, "sdpa": s["sdpa"]}
    if s["bf16_frozen"] and precision is not None and str(precision).startswith("bf16"):
        for part in frozen_children(task):
            bf16_frozen(part)
            applied["bf16_frozen"] += sum(p.numel() for p in part.parameters())
    _layout_kernels_compile(task, s, _device_of(task, device), applied)
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
    if s["cudnn_benchmark"] and device.type == "cuda":
        # Process-wide, as Lightning's Trainer(benchmark=True) sets it; never switched back off
        # here, so a trainer's explicit choice stands when the switch is off.
        torch.backends.cudnn.benchmark = True
        applied["cudnn_benchmark"] = True
    # The matmul path for wide heads is measured on CUDA only (bench row attn); CPU keeps SDPA.
    applied["wide_heads"] = wide_head_attention(task) if s["wide_heads_matmul"] and device.type == "cuda" else 0
    # Compile only where Triton/inductor pays (CUDA): on CPU (tests, CI) it costs minutes of
    # C++ compilation for nothing measured.
    if compile and device.type == "cuda":
        options = inductor_options(s)
        for net, regional in compile_plan(task, s):
            applied["compiled"] += compile_module(net, s["compile"], regional=regional, dynamic=s["compile_dynamic"],
                                                  options=options)


def inductor_options(s: Mapping[str, Any]) -> dict[str, Any]:
    """Inductor settings the switches ask for (empty: the compile mode's own)."""
    # Inductor decides per graph whether to lay intermediates out channels-last; its heuristics
    # say no for graphs without aten.convolution (every backward graph) and for convolutions with
    # in >= 2x out channels (the UNet's up-block ResNets, after the skip concat).
    return {"force_layout_optimization": True} if s["force_layout_opt"] else {}


def uses_cudagraphs(s: Mapping[str, Any]) -> bool:
    """Whether the compile mode records inductor's own CUDA graphs (reduce-overhead, max-autotune)."""
    if s["compile"] in (None, "none"):
        return False
    from torch._inductor import list_mode_options

    return bool(list_mode_options(s["compile"]).get("triton.cudagraphs", False))


# The same kernels without inductor's CUDA graphs.
_WITHOUT_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def guard_accumulation(s: dict[str, Any], accumulate_grad_batches: int) -> dict[str, Any]:
    """Checked settings (:func:`settings`) made safe for ``accumulate_grad_batches`` micro-batches.

    Inductor's CUDA graphs hand every replay the same output memory; the first micro-batch's
    gradient, which AccumulateGrad keeps as ``.grad`` without a copy, is then overwritten by the
    next backward: silently wrong gradients or an "overwritten by a subsequent run" error
    (pytorch/pytorch#169545, open as of torch 2.11). So with accumulation the training compile
    keeps its kernels and drops the graphs (``train.compile`` replaced; evaluation, which never
    accumulates, keeps the top level). Returns ``s`` itself when nothing has to change."""
    training = training_settings(s)
    if accumulate_grad_batches <= 1 or not uses_cudagraphs(training):
        return s
    return {**s, "train": {**s.get("train", {}), "compile": _WITHOUT_CUDAGRAPHS.get(training["compile"], "default")}}


def compile_plan(task: nn.Module, s: Mapping[str, Any]) -> list[tuple[nn.Module, bool]]:
    """What :func:`configure_task` compiles, in order: ``(module, regional)`` pairs. Glue modules
    are compiled whole; the codec whole too with ``compile_codec_whole`` (its encoder and decoder:
    no eager convs, pads and bias adds between the blocks); the rest as ``compile_regional`` says."""
    codec = getattr(getattr(task, "backbone", None), "codec", None)
    plan = []
    for part in _compile_targets(task):
        whole = type(part).__name__ in GLUE_MODULES or (part is codec and s["compile_codec_whole"])
        regional = s["compile_regional"] and not whole
        plan += [(net, regional) for net in ([part] if regional else _called_nets(part))]
    return plan


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
                               "inference": True, "fused_qkv": 0}
    if s["fuse_qkv"]:
        # Before the cast, so that the new fused layers are stored in bf16 too.
        with torch.no_grad():
            applied["fused_qkv"] = fuse_qkv(task)
    if bf16:
        applied["bf16_frozen"] = store_in(task, torch.bfloat16)
    _layout_kernels_compile(task, s, device, applied, compile=compile)
    return applied


# Small modules of many eager ops between the nets (adaptation: reference fusion with warps,
# per-level matching): compiled whole, as one region each, so the step does not wait on the host.
GLUE_MODULES = ("ReferenceFusion", "FlowMatcher")


def _called_nets(part: nn.Module) -> list[nn.Module]:
    """What a whole-net compile must wrap: the modules whose ``forward`` runs. A VAE codec is
    called through ``encode``/``decode``, never ``forward``, so its encoder and decoder."""
    vae = getattr(part, "vae", None)
    nets = [getattr(vae, name, None) for name in ("encoder", "decoder")] if vae is not None else []
    return [n for n in nets if n is not None] or [part]


def _compile_targets(task: nn.Module) -> list[nn.Module]:
    """The conv nets worth compiling: the UNet, control nets and the codec (never the tokenizer),
    then the glue modules (:data:`GLUE_MODULES`)."""
    backbone = getattr(task, "backbone", None)
    targets = [m for m in (getattr(backbone, "unet", None), getattr(backbone, "codec", None)) if m is not None]
    seen = {id(m) for m in targets}
    for names in (("ControlUNet",), GLUE_MODULES):
        for module in task.modules():
            if type(module).__name__ in names and id(module) not in seen:
                targets.append(module)
                seen.add(id(module))
    return targets
