"""Kernels and storage: bf16 frozen weights, channels-last, the SDPA kernel family, wide attention
heads as matmul, fused AdamW. Each is usable on its own; ``configure``
applies them as the switches say."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable

import torch
from torch import nn

from icp.core.errors import ConfigError
from icp.perf.switches import SDPA_BACKENDS


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
