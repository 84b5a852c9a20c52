"""icp.perf switches give the plain path's results (within bf16 tolerance) on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from icp import perf
from icp.data import keys as K
from icp.errors import ConfigError
from icp.models.backbone import tiny


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield
    perf.set_sdpa_backend("auto")


def _unet_loss(unet, seed=0, memory_format=torch.contiguous_format, autocast=True, return_pred=False):
    gen = torch.Generator().manual_seed(seed)
    c = unet.config.in_channels
    x = torch.randn(2, c, 8, 8, generator=gen).contiguous(memory_format=memory_format)
    noise = torch.randn(2, c, 8, 8, generator=gen)
    text = torch.randn(2, 16, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([10, 500])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        pred = unet(x, t, encoder_hidden_states=text).sample
    return pred.float() if return_pred else F.mse_loss(pred.float(), noise)


def _norm_rel(a, b):
    return float((a - b).norm() / b.norm())


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


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
    ga = ref.conv_in.weight.grad
    gb = fast.conv_in.weight.grad
    assert _rel(gb, ga) < 1e-3


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


def test_bad_names_are_config_errors():
    with pytest.raises(ConfigError, match="perf.sdpa"):
        perf.set_sdpa_backend("fastest")
    with pytest.raises(ConfigError, match="perf.compile"):
        perf.compile_module(torch.nn.Linear(2, 2), mode="turbo")


def test_regional_compile_counts_blocks_and_keeps_results():
    ref = tiny(resolution=32, width=32, seed=4).unet.eval()
    fast = tiny(resolution=32, width=32, seed=4).unet.eval()
    # aot_eager traces forward and backward like inductor but generates no code: fast on CPU.
    n = perf.compile_module(fast, mode="default", regional=True, backend="aot_eager")
    blocks = [m for m in ref.modules() if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel")]
    assert n == len(blocks) > 0
    assert perf.compile_module(fast, mode="none") == 0
    with torch.no_grad():
        a, b = _unet_loss(ref, autocast=False), _unet_loss(fast, autocast=False)
    assert torch.allclose(a, b, rtol=1e-5)


def test_graphed_is_identity_off_cuda():
    fn = torch.nn.Linear(3, 3)
    assert perf.graphed(fn, torch.randn(2, 3)) is fn


def _batch(n=2, res=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(n, 3, res, res, generator=gen) * 2 - 1
    keep = (torch.rand(n, 1, res, res, generator=gen) > 0.8).float()
    return {K.PROFILE: torch.rand(n, 3, res, res, generator=gen) * 2 - 1, K.TARGET: target,
            K.TARGET_MASKED: target * keep, K.TARGET_KEEP: keep}


def test_configure_task_loss_within_bf16_tolerance_of_plain_path():
    from icp.tasks.stitching import StitchingTask

    def loss(task):
        gen = torch.Generator().manual_seed(7)
        task.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return float(task.losses(_batch(), generator=gen)["loss"].detach())

    plain = StitchingTask(tiny(resolution=32, width=32, seed=5), cond_drop_prob=0.0)
    fast = StitchingTask(tiny(resolution=32, width=32, seed=5), cond_drop_prob=0.0)
    applied = perf.configure_task(fast, precision="bf16-mixed")
    # The frozen generation UNet and text encoder went to bf16; the trained Appearance Net did not.
    assert applied["bf16_frozen"] > 0
    assert fast.backbone.unet.conv_in.weight.dtype == torch.bfloat16
    assert fast.appearance.net.conv_in.weight.dtype == torch.float32
    assert fast.appearance.net.conv_in.weight.requires_grad
    a, b = loss(plain), loss(fast)
    assert abs(a - b) / a < 3e-2
    # A 32-true run keeps fp32 weights (bf16 weights would meet fp32 activations).
    other = StitchingTask(tiny(resolution=32, width=32, seed=5))
    assert perf.configure_task(other, precision="32-true")["bf16_frozen"] == 0


def test_memoize_text_returns_same_states_and_skips_the_encoder():
    backbone = tiny(resolution=32, width=32, seed=6)
    backbone.text_encoder.requires_grad_(False)
    ref = backbone.encode_text(["a photo of a person", ""])
    calls = []
    backbone.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    perf.memoize_text(backbone)
    first = backbone.encode_text(["a photo of a person", ""])
    second = backbone.encode_text(["a photo of a person", ""])
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert len(calls) == 1
    backbone.encode_text(["a face"])
    assert len(calls) == 2
    # A trainable encoder is never cached.
    backbone.text_encoder.requires_grad_(True)
    backbone.encode_text(["a photo of a person", ""])
    assert len(calls) == 3
