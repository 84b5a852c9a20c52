"""Tests of the reference-feature fusion (icp.models.fusion)."""

import torch

from icp.models.fusion import ReferenceFusion, reference_features


def _levels(b=2, chans=(4, 8), sizes=((8, 8), (4, 4)), seed=0):
    g = torch.Generator().manual_seed(seed)
    ident = [torch.randn(b, c, *s, generator=g) for c, s in zip(chans, sizes)]
    light = [torch.randn(b, c, *s, generator=g) for c, s in zip(chans, sizes)]
    flows = [torch.randn(b, 2, *s, generator=g) for s in sizes]
    return ident, light, flows


def test_injection_is_exactly_zero_at_init():
    ident, light, flows = _levels()
    fusion = ReferenceFusion([4, 8], [6, 10])
    res = fusion(ident, light, flows)
    assert [r.shape for r in res] == [torch.Size([2, 6, 8, 8]), torch.Size([2, 10, 4, 4])]
    assert all(torch.count_nonzero(r) == 0 for r in res)
    # ... but the projections receive gradient, so training can open the path.
    sum(r.sum() for r in res).backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in fusion.proj)


def test_reference_features_warp_plus_lighting_concat_identity():
    ident, light, _ = _levels(b=1, chans=(3,), sizes=((5, 6),))
    zero = torch.zeros(1, 2, 5, 6)
    ref = reference_features(ident[0], light[0], zero)
    assert ref.shape == (1, 6, 5, 6)
    assert torch.allclose(ref[:, :3], ident[0] + light[0], atol=1e-5)
    assert torch.equal(ref[:, 3:], ident[0])
    shift = zero.clone()
    shift[:, 0] = 1
    ref2 = reference_features(ident[0], light[0], shift)
    assert torch.allclose(ref2[:, :3, :, :-1], ident[0][..., 1:] + light[0][..., :-1], atol=1e-5)


def test_warp_switch_changes_output_after_training_step():
    ident, light, flows = _levels()
    warped, plain = ReferenceFusion([4, 8]), ReferenceFusion([4, 8], warp_identity=False)
    for f in (warped, plain):
        for p in f.proj:
            torch.nn.init.ones_(p.weight)
    a, b = warped(ident, light, flows), plain(ident, light, flows)
    assert not torch.allclose(a[0], b[0])
    assert torch.allclose(plain(ident, light, None)[0], b[0])
