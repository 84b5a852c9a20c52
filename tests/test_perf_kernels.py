"""icp.perf.kernels: each kernel / storage switch gives the plain path's results (within bf16
tolerance) on CPU: bf16 frozen weights, channels-last, SDPA kernels, wide heads as matmul, fused
q/k/v, fused AdamW, cuDNN's algorithm search."""

from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.nn.functional as F

from icp import perf
from icp.models.backbone import tiny
from tests.perf_helpers import _norm_rel, _rel, _stitching, _unet_loss, _vae_attention
from tests.perf_helpers import _threads  # noqa: F401 (autouse: one thread, the SDPA kernel reset)


def test_bf16_frozen_matches_fp32_weights_under_autocast():
    ref = tiny(resolution=32, width=32, seed=1).unet.eval()
    fast = tiny(resolution=32, width=32, seed=1).unet.eval()
    perf.bf16_frozen(fast)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in fast.parameters())
    with torch.no_grad():
        a, b = _unet_loss(ref, return_pred=True), _unet_loss(fast, return_pred=True)
        # bf16 tolerance (bf16 has 8 mantissa bits); autocast already ran the fp32 weights in bf16.
        assert _norm_rel(b, a) < 2e-2
        # Not vacuous: another seed's weights predict something clearly different.
        other = tiny(resolution=32, width=32, seed=2).unet.eval()
        assert _norm_rel(_unet_loss(other, return_pred=True), a) > 0.2


def test_channels_last_same_loss_and_grads():
    ref = tiny(resolution=32, width=32, seed=3).unet
    fast = tiny(resolution=32, width=32, seed=3).unet
    perf.channels_last(fast)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast.parameters())
    la = _unet_loss(ref, autocast=False)
    lb = _unet_loss(fast, memory_format=torch.channels_last, autocast=False)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, rtol=1e-4, atol=1e-6)
    assert _rel(fast.conv_in.weight.grad, ref.conv_in.weight.grad) < 1e-3


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_sdpa_backend_same_attention(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=gen) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    with perf.sdpa_backend(backend):
        out = F.scaled_dot_product_attention(q, k, v)
    assert _rel(out, ref) < 1e-4
    perf.set_sdpa_backend(backend)
    assert _rel(F.scaled_dot_product_attention(q, k, v), ref) < 1e-4


def test_fused_optimizer_only_for_unset_adam_on_cuda():
    cuda = [types.SimpleNamespace(is_cuda=True, is_floating_point=lambda: True)]
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3)
    fused = perf.fused_optimizer(adamw, cuda)
    assert fused.keywords == {"lr": 1e-3, "fused": True} and fused.func is torch.optim.AdamW
    assert perf.fused_optimizer(adamw, cpu) is adamw  # fused AdamW needs CUDA tensors
    chosen = functools.partial(torch.optim.AdamW, lr=1e-3, foreach=False)
    assert perf.fused_optimizer(chosen, cuda) is chosen  # the user's explicit choice stands
    sgd = functools.partial(torch.optim.SGD, lr=1e-3)
    assert perf.fused_optimizer(sgd, cuda) is sgd


def test_wide_heads_run_as_chunked_matmul_with_the_same_result(monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor

    attn, x = _vae_attention(), torch.randn(5, 320, 6, 6)
    narrow = _vae_attention(width=64)
    with torch.no_grad():
        ref = attn(x)
        # Only heads wider than the limit change processor (the SD VAE's 512 > 256).
        assert perf.wide_head_attention(narrow) == 0 and perf.wide_head_attention(attn) == 1
        calls = []
        real = AttnProcessor.__call__
        monkeypatch.setattr(AttnProcessor, "__call__", lambda self, a, h, *r, **k: calls.append(h.shape[0])
                            or real(self, a, h, *r, **k))
        assert perf.wide_head_attention(attn) == 0  # once
        out = attn(x)  # default limit: one chunk of 5
        attn.set_processor(perf.WideHeadAttention(max_scores=2 * 36 * 36))
        chunked = attn(x)  # 2 samples of 36x36 scores per chunk
        attn.set_processor(perf.WideHeadAttention(max_scores=36 * 36 - 1))
        fallback = attn(x)  # one sample is over the limit: SDPA
    assert calls == [5, 2, 2, 1]
    for got in (out, chunked, fallback):
        assert _rel(got, ref) < 1e-5
    assert _rel(attn(torch.randn(5, 320, 6, 6)), ref) > 0.1  # not vacuous


def test_wide_heads_switch_applies_on_cuda_only():
    task = _stitching()  # tiny nets: no wide heads anyway; the switch is CUDA-only
    assert task.configure_perf(precision="bf16-mixed", device="cpu")["wide_heads"] == 0
