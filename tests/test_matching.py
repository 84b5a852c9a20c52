"""Unit tests of the matching maths (icp.models.matching)."""

import pytest
import torch

from icp.models import matching as M


def _shifted_pair(dx: int, dy: int, h: int = 12, w: int = 14, c: int = 24, seed: int = 0):
    """Random profile features and a target that is the profile shifted so target(x, y) = profile(x+dx, y+dy)."""
    g = torch.Generator().manual_seed(seed)
    feat_s = torch.randn(2, c, h, w, generator=g)
    feat_t = torch.roll(feat_s, shifts=(-dy, -dx), dims=(2, 3))
    return feat_t, feat_s


def _interior(h, w, dx, dy):
    """Target pixels whose (non-wrapped) correspondence lies inside the profile."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ok = (xs + dx >= 0) & (xs + dx < w) & (ys + dy >= 0) & (ys + dy < h)
    return ok.float().view(1, 1, h, w)


def test_zero_flow_warp_is_identity():
    feat = torch.randn(2, 5, 7, 9)
    out = M.warp(feat, torch.zeros(2, 2, 7, 9))
    assert torch.allclose(out, feat, atol=1e-5)


def test_warp_integer_shift_matches_roll():
    feat = torch.randn(1, 3, 8, 10)
    flow = torch.zeros(1, 2, 8, 10)
    flow[:, 0] = 2  # sample 2 pixels to the right
    out = M.warp(feat, flow)
    assert torch.allclose(out[..., :-2], feat[..., 2:], atol=1e-5)
    assert torch.all(out[..., -2:] == 0)  # outside the profile -> zeros


@pytest.mark.parametrize("dx,dy", [(3, -2), (-1, 4), (0, 0)])
def test_argmax_flow_recovers_integer_shift(dx, dy):
    feat_t, feat_s = _shifted_pair(dx, dy)
    h, w = feat_t.shape[-2:]
    flow = M.argmax_flow(M.correlation(feat_t, feat_s), (h, w))
    valid = _interior(h, w, dx, dy)
    gt = torch.tensor([dx, dy], dtype=torch.float32).view(1, 2, 1, 1).expand(2, 2, h, w)
    assert M.endpoint_error(flow, gt, valid.expand(2, 1, h, w)).item() == 0.0
    assert M.pck(flow, gt, valid.expand(2, 1, h, w), threshold=0.5).item() == 1.0
    # and warping the profile by that flow reproduces the target where it is defined
    warped = M.warp(feat_s, flow)
    assert torch.allclose(warped * valid, feat_t * valid, atol=1e-5)


def test_chunked_equals_unchunked():
    feat_t, feat_s = torch.randn(2, 8, 9, 6), torch.randn(2, 8, 5, 7)
    full = M.correlation(feat_t, feat_s)
    assert full.shape == (2, 9 * 6, 5, 7)
    for rows in (1, 2, 4, 100):
        assert torch.allclose(M.correlation(feat_t, feat_s, chunk_rows=rows), full, atol=1e-6)
        assert torch.equal(M.match(feat_t, feat_s, "argmax", chunk_rows=rows), M.argmax_flow(full, (9, 6)))
        soft = M.match(feat_t, feat_s, "soft", temperature=0.1, chunk_rows=rows)
        assert torch.allclose(soft, M.soft_argmax_flow(full, (9, 6), 0.1), atol=1e-5)


def test_correlation_is_cosine():
    feat_t, feat_s = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    cost = M.correlation(feat_t * 7.0, feat_s * 0.1)
    assert cost.abs().max() <= 1 + 1e-5
    ref = torch.nn.functional.cosine_similarity(feat_t[0, :, 1, 2], feat_s[0, :, 2, 0], dim=0)
    assert torch.allclose(cost[0, 1 * 3 + 2, 2, 0], ref, atol=1e-5)


def test_soft_argmax_is_differentiable_and_tends_to_argmax():
    feat_t, feat_s = _shifted_pair(2, 1, h=6, w=7, c=16)
    feat_t = feat_t.double().requires_grad_(True)
    feat_s = feat_s.double()
    flow = M.match(feat_t, feat_s, "soft", temperature=0.2)
    flow.square().sum().backward()
    assert feat_t.grad is not None and torch.isfinite(feat_t.grad).all() and feat_t.grad.abs().sum() > 0
    # gradcheck on a tiny volume
    cost = torch.randn(1, 4, 2, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: M.soft_argmax_flow(c, (2, 2), 0.5), (cost,))
    # sharper temperature -> closer to the hard argmax
    with torch.no_grad():
        c = M.correlation(feat_t, feat_s)
        hard = M.argmax_flow(c, (6, 7))
        errs = [(M.soft_argmax_flow(c, (6, 7), t) - hard).abs().max().item() for t in (1.0, 0.1, 0.005)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3


def test_upsample_flow_scales_magnitudes():
    flow = torch.ones(1, 2, 4, 4)
    flow[:, 1] = -0.5
    up = M.upsample_flow(flow, (16, 8))
    assert up.shape == (1, 2, 16, 8)
    assert torch.allclose(up[:, 0], torch.full((1, 16, 8), 2.0))   # width x2
    assert torch.allclose(up[:, 1], torch.full((1, 16, 8), -2.0))  # height x4
    down, valid = M.downsample_flow(up, (4, 4), torch.ones(1, 1, 16, 8))
    assert torch.allclose(down, flow, atol=1e-6) and valid.min() == 1


def test_upsampled_shift_flow_warps_image():
    """A flow found at 1/4 resolution, upsampled, warps the full-resolution image correctly."""
    img = torch.randn(1, 3, 16, 16)
    flow = torch.zeros(1, 2, 4, 4)
    flow[:, 0] = 1  # one feature cell = 4 pixels
    up = M.upsample_flow(flow, (16, 16))
    out = M.warp(img, up)
    assert torch.allclose(out[..., :12], img[..., 4:], atol=1e-5)


def test_metrics():
    gt = torch.zeros(1, 2, 2, 2)
    flow = torch.zeros(1, 2, 2, 2)
    flow[0, 0, 0, 0] = 3.0
    flow[0, 1, 0, 0] = 4.0  # one pixel off by 5
    assert M.endpoint_error(flow, gt).item() == pytest.approx(5 / 4)
    valid = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    assert M.endpoint_error(flow, gt, valid).item() == 0.0
    assert M.pck(flow, gt, threshold=1.0).item() == pytest.approx(0.75)
    assert M.pck(flow, gt, threshold=6.0).item() == 1.0
    assert torch.isnan(M.endpoint_error(flow, gt, torch.zeros_like(valid)))


def test_flow_to_color():
    flow = torch.zeros(2, 2, 5, 6)
    flow[0, 0] = 1.0  # rightwards
    flow[1, 0] = -1.0  # leftwards
    col = M.flow_to_color(flow)
    assert col.shape == (2, 3, 5, 6) and col.min() >= 0 and col.max() <= 1
    assert not torch.allclose(col[0], col[1])  # direction changes the hue
    white = M.flow_to_color(torch.zeros(1, 2, 3, 3))
    assert torch.allclose(white, torch.ones_like(white))  # zero flow is white
