"""The procedural head renderer: determinism, shapes, and that its ground truth is right."""

import math

import pytest
import torch
import torch.nn.functional as F

from icp.render import renderer as R
from icp.core.errors import DataError

RES = 64


def ambient_light(level: float = 1.0) -> torch.Tensor:
    """A pose-independent light (27,): uniform radiance ``level`` in every channel (SH band 0 only)."""
    sh = torch.zeros(3, 9)
    sh[:, 0] = level * 2 * math.sqrt(math.pi)
    return sh.reshape(R.LIGHT_DIM)


@pytest.fixture(scope="module")
def pair():
    """One identity seen at two poses under the same pose-independent (ambient) light."""
    ident = R.sample_identity(3, seed=11)[None].expand(2, -1)
    pose = torch.tensor([[-20.0, 5.0, 3.0], [15.0, -5.0, -4.0]])
    light = ambient_light(0.9)[None].expand(2, -1)
    bg = R.sample_view(3, 0, seed=11)[2][None].expand(2, -1)
    out = R.render(ident, pose, light, bg, RES)
    a = {k: v[:1] for k, v in out.items()}
    b = {k: v[1:] for k, v in out.items()}
    return a, b, pose


def _warp(img, flow):
    """Sample img at pixel + flow (align_corners=True pixel-centre convention)."""
    _, _, h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype),
                            indexing="ij")
    x = (xs + flow[:, 0]) / (w - 1) * 2 - 1
    y = (ys + flow[:, 1]) / (h - 1) * 2 - 1
    return F.grid_sample(img, torch.stack([x, y], -1), align_corners=True)


def _psnr(x, y, mask):
    mse = (((x - y) ** 2) * mask).sum() / (mask.sum() * x.shape[1])
    return 10 * math.log10(1.0 / mse.item())


def test_render_group_is_deterministic_and_well_formed():
    a = R.render_group(7, num_views=2, resolution=32, seed=5)
    b = R.render_group(7, num_views=2, resolution=32, seed=5)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = R.render_group(8, num_views=2, resolution=32, seed=5)
    assert not torch.equal(a["rgb"], c["rgb"])
    assert a["rgb"].shape == (2, 3, 32, 32) and a["fg"].shape == (2, 1, 32, 32)
    assert a["coords"].shape == (2, 3, 32, 32) and a["depth"].shape == (2, 1, 32, 32)
    assert a["normals"].shape == (2, 3, 32, 32)
    assert a["landmarks"].shape == (2, R.NUM_LANDMARKS, 2) and R.NUM_LANDMARKS >= 5
    assert a["landmarks_visible"].shape == (2, R.NUM_LANDMARKS)
    assert a["identity"].shape == (2, R.IDENTITY_DIM) and a["light"].shape == (2, R.LIGHT_DIM)
    assert a["rgb"].min() >= 0 and a["rgb"].max() <= 1
    assert set(a["fg"].unique().tolist()) == {0.0, 1.0}
    bg = a["fg"] == 0
    assert (a["coords"] * bg).abs().max() == 0 and (a["depth"] * bg).abs().max() == 0
    fgd = a["depth"][a["fg"] > 0]
    assert fgd.min() > R.CAM_DIST - 2 and fgd.max() < R.CAM_DIST + 2
    assert 0.15 < a["fg"].mean() < 0.9


def test_sampling_is_seeded():
    assert torch.equal(R.sample_identity(4, 1), R.sample_identity(4, 1))
    assert not torch.equal(R.sample_identity(4, 1), R.sample_identity(4, 2))
    assert not torch.equal(R.sample_identity(4, 1), R.sample_identity(5, 1))
    p, l, b = R.sample_view(4, 2, 1, yaw_max=75.0)
    assert p.shape == (3,) and l.shape == (R.LIGHT_DIM,) and b.shape == (R.BACKGROUND_DIM,)
    yaws = torch.stack([R.sample_view(0, v, 0)[0][0] for v in range(200)])
    assert yaws.abs().max() <= 75 and yaws.max() > 60 and yaws.min() < -60


def test_project_reproduces_the_pixel_grid(pair):
    a, _, pose = pair
    xy, depth = R.project(a["coords"], pose[:1], RES)
    fg = a["fg"][0, 0] > 0
    ys, xs = torch.meshgrid(torch.arange(RES), torch.arange(RES), indexing="ij")
    err = (xy[0, 0] - xs).abs().maximum((xy[0, 1] - ys).abs())[fg]
    assert err.max() < 0.5, err.max()
    assert (depth[0, 0] - a["depth"][0, 0])[fg].abs().max() < 1e-4


def test_ground_truth_flow_warps_one_view_onto_the_other(pair):
    a, b, pose = pair
    # flow from target b to profile a; warping a by it must give b on co-visible pixels
    flow, valid = R.ground_truth_flow(b, a, pose[:1], RES)
    assert flow.shape == (1, 2, RES, RES) and valid.shape == (1, 1, RES, RES)
    assert valid.sum() > 0.6 * b["fg"].sum()
    assert (valid <= b["fg"]).all() and (flow * (1 - valid)).abs().max() == 0
    # stay one pixel away from silhouettes, where bilinear sampling mixes in the background
    core = -F.max_pool2d(-valid, 3, 1, 1)
    # same light (ambient: pose-independent shading) -> only resampling error remains.
    # Measured 30.8 dB at 64 px (un-warped: 21 dB); bound with margin.
    psnr = _psnr(_warp(a["rgb"], flow), b["rgb"], core)
    assert psnr > 27, psnr
    assert _psnr(a["rgb"], b["rgb"], core) < psnr - 6
    # geometric check: the profile's surface coordinates, warped, equal the target's; a flow
    # off by 1.5 px is clearly worse (one pixel is ~0.05 canonical units at 64 px)
    def coord_err(f):
        return (_warp(a["coords"], f) - b["coords"]).norm(dim=1, keepdim=True)[core > 0].median()
    err = coord_err(flow)
    assert err < 0.012, err
    assert coord_err(flow + torch.tensor([1.5, 0.0])[None, :, None, None]) > 3 * err


def test_occluded_points_are_not_valid():
    """A strongly turned profile hides the far cheek: those target pixels must be invalid."""
    ident = R.sample_identity(1, seed=0)[None].expand(2, -1)
    pose = torch.tensor([[0.0, 0.0, 0.0], [70.0, 0.0, 0.0]])
    light = ambient_light()[None].expand(2, -1)
    out = R.render(ident, pose, light, torch.zeros(2, R.BACKGROUND_DIM), 48)
    tgt = {k: v[:1] for k, v in out.items()}
    prof = {k: v[1:] for k, v in out.items()}
    _, valid = R.ground_truth_flow(tgt, prof, pose[1:], 48)
    fg = tgt["fg"]
    # yaw +70 turns the face towards +x: the +x cheek faces away from the camera, hidden
    far = (tgt["coords"][:, 0:1] > 0.3) & (tgt["coords"][:, 2:3] > 0.2) & (fg > 0)
    assert far.sum() > 20
    assert valid[far].mean() < 0.1
    near = (tgt["coords"][:, 0:1] < -0.2) & (tgt["coords"][:, 2:3] > 0.2) & (fg > 0)
    assert valid[near].mean() > 0.8


def test_landmarks_land_on_the_face(pair):
    a, b, _ = pair
    for v in (a, b):
        lm, vis = v["landmarks"][0], v["landmarks_visible"][0]
        assert vis[:5].all()
        px = lm[:5].round().long()
        assert (v["fg"][0, 0, px[:, 1], px[:, 0]] > 0).all()
        leye, reye, nose, lmouth, rmouth = lm[:5]
        assert leye[0] < reye[0] and lmouth[0] < rmouth[0]
        assert leye[1] < nose[1] < lmouth[1] and reye[1] < nose[1] < rmouth[1]
        assert min(leye[0], lmouth[0]) < nose[0] < max(reye[0], rmouth[0])


def test_pose_changes_the_image_and_follows_the_convention():
    ident = R.sample_identity(2, seed=0)[None].expand(3, -1)
    pose = torch.tensor([[0.0, 0.0, 0.0], [30.0, 0.0, 0.0], [-30.0, 0.0, 0.0]])
    light = ambient_light()[None].expand(3, -1)
    out = R.render(ident, pose, light, torch.zeros(3, R.BACKGROUND_DIM), 48)
    assert (out["rgb"][0] - out["rgb"][1]).abs().mean() > 0.02
    nose_x = out["landmarks"][:, 2, 0]
    assert nose_x[1] > nose_x[0] + 3 and nose_x[2] < nose_x[0] - 3  # positive yaw: towards +x


def test_coarse_prepass_matches_full_trace(monkeypatch):
    ident = torch.stack([R.sample_identity(i, 0) for i in range(2)])
    pose, light, bg = (torch.stack(x) for x in zip(*[R.sample_view(i, 1, 0) for i in range(2)]))
    fast = R.render(ident, pose, light, bg, RES)
    monkeypatch.setattr(R, "PRE", 10**6)
    full = R.render(ident, pose, light, bg, RES)
    assert (fast["fg"] != full["fg"]).float().mean() < 2e-3
    both = (fast["fg"] * full["fg"]) > 0
    d = (fast["coords"] - full["coords"]).norm(dim=1, keepdim=True)[both]
    assert d.median() < 1e-4 and d.quantile(0.95) < 5e-3  # the rest: grazing silhouette rays


def test_bad_inputs_raise_one_line_errors():
    ident = R.sample_identity(0, 0)[None]
    pose, light, bg = (x[None] for x in R.sample_view(0, 0, 0))
    with pytest.raises(DataError, match="light"):
        R.render(ident, pose, light[:, :5], bg, 32)
    with pytest.raises(DataError, match="resolution"):
        R.render(ident, pose, light, bg, 4)
