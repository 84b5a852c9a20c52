"""Procedural 3D head renderer with exact ground truth (paper §3.3's synthetic profile data).

Method: sphere tracing of a signed distance function (``head_model.head_sdf``), batched over
all rays of all images in pure PyTorch (CPU or GPU), then SH lighting (``lighting``) with
ambient occlusion, a soft cast shadow from the light's dominant direction and a Blinn-Phong
highlight. Everything is seeded and deterministic: the same arguments give the same bytes on a
given device.

Conventions (shared with ``icp/data/keys.py`` and the matching code):
- Pixel (x, y) has its centre at (x, y), x in [0, W-1] to the right, y in [0, H-1] downwards;
  that is ``grid_sample(..., align_corners=True)``'s convention (normalised -1 = pixel 0 centre).
- Canonical frame: x to the image right at yaw 0, y up, z out of the face; units of 10 cm.
- Pose (yaw, pitch, roll) in degrees rotates the whole bust about the canonical origin
  (between the eyes): positive yaw turns the face towards the image right, positive pitch tilts
  it up, positive roll turns the image counter-clockwise. ``R = Rz(roll) Rx(-pitch) Ry(yaw)``.
- Camera: pinhole at (0, CAM_Y, CAM_DIST) looking down -z, no rotation; ``depth`` is the
  distance along the optical axis (camera z), and 0 on the background (like ``coords``).
- ``normals`` are unit normals in the camera frame, 0 on the background.
- Landmarks: see ``head_model.canonical_landmarks`` for the order (the first five are MTCNN's).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor

from icp.render import head_model as hm
from icp.render.head_albedo import albedo
from icp.render.lighting import LIGHT_DIM, ambient, dominant, irradiance, sample_light
from icp.core.errors import DataError

IDENTITY_DIM = hm.IDENTITY_DIM
NUM_LANDMARKS = hm.NUM_LANDMARKS
BACKGROUND_DIM = 7  # top sRGB (3), bottom sRGB (3), gradient angle in radians (1)
CAM_DIST = 10.0     # 1 m: a portrait lens distance, mild perspective
CAM_Y = -0.25       # puts the eyes ~42% from the top, as in FFHQ-style crops
HALF_SPAN = 1.65    # half the image height at the origin's depth, canonical units
STEPS = 64          # sphere-tracing iterations at most (rays are compacted every COMPACT steps)
COMPACT = 3
HIT_PX = 0.3        # a ray hits when the surface is within this fraction of its pixel footprint
PRE = 4             # coarse pre-pass at 1/PRE resolution finds where rays should start
PRE_MARGIN = 0.15
__all__ = ["IDENTITY_DIM", "LIGHT_DIM", "NUM_LANDMARKS", "BACKGROUND_DIM", "sample_identity",
           "sample_view", "render", "project", "ground_truth_flow", "render_group",
           "rotation_matrix"]


def _generator(*ints: int) -> torch.Generator:
    """A CPU generator seeded from a stable hash of the integers (stable across processes)."""
    h = hashlib.sha256(",".join(str(int(i)) for i in ints).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


def sample_identity(identity_index: int, seed: int) -> Tensor:
    """Identity parameters (IDENTITY_DIM,) in [0, 1]; deterministic in (seed, identity_index)."""
    gen = _generator(seed, identity_index, 1)
    u = torch.rand(IDENTITY_DIM, generator=gen)
    m = torch.rand(1, generator=gen).item()  # shared "masculinity" latent
    for name, sign in hm.MASCULINE.items():
        i = hm.FIELD_INDEX[name]
        u[i] = 0.7 * u[i] + 0.3 * (m if sign > 0 else 1 - m)
    return u


def sample_view(identity_index: int, view_index: int, seed: int, yaw_max: float = 75.0,
                pitch_max: float = 20.0, roll_max: float = 10.0) -> tuple[Tensor, Tensor, Tensor]:
    """Pose (3,) degrees, light (LIGHT_DIM,), background (BACKGROUND_DIM,) of one view."""
    gen = _generator(seed, identity_index, view_index, 2)
    u = torch.rand(3, generator=gen) * 2 - 1
    pose = u * torch.tensor([yaw_max, pitch_max, roll_max])
    light = sample_light(gen)
    b = torch.rand(7, generator=gen)
    grey = 0.2 + 0.6 * b[3]
    top = grey + (0.15 + 0.7 * b[:3] - grey) * (0.2 + 0.5 * b[4])  # muted, studio-like colours
    bottom = (top * (0.55 + 0.5 * b[5]) + 0.08 * (b[3:6] - 0.5)).clamp(0, 1)
    background = torch.cat([top, bottom, (b[6:] - 0.5) * 1.5])
    return pose, light, background


def rotation_matrix(pose: Tensor) -> Tensor:
    """(B, 3) yaw, pitch, roll in degrees -> (B, 3, 3) canonical-to-camera-frame rotation."""
    yaw, pitch, roll = torch.deg2rad(pose).unbind(-1)
    o, z = torch.ones_like(yaw), torch.zeros_like(yaw)
    cy, sy, cp, sp, cr, sr = yaw.cos(), yaw.sin(), pitch.cos(), pitch.sin(), roll.cos(), roll.sin()
    ry = torch.stack([cy, z, sy, z, o, z, -sy, z, cy], -1).view(-1, 3, 3)
    rx = torch.stack([o, z, z, z, cp, sp, z, -sp, cp], -1).view(-1, 3, 3)  # Rx(-pitch)
    rz = torch.stack([cr, -sr, z, sr, cr, z, z, z, o], -1).view(-1, 3, 3)
    return rz @ rx @ ry


def _focal(resolution: int) -> float:
    return (resolution / 2) / (HALF_SPAN / CAM_DIST)


def project(coords: Tensor, pose: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """Canonical points (B, 3, ...) seen in pose -> pixel xy (B, 2, ...) and depth (B, 1, ...)."""
    if pose.shape != (coords.shape[0], 3) or coords.shape[1] != 3:
        raise DataError(f"project: coords {tuple(coords.shape)} and pose {tuple(pose.shape)} must "
                        "be (B, 3, ...) and (B, 3)")
    rot = rotation_matrix(pose.to(coords))
    pw = torch.einsum("bij,bj...->bi...", rot, coords)
    depth = CAM_DIST - pw[:, 2:3]
    f, c = _focal(resolution), (resolution - 1) / 2
    x = c + f * pw[:, 0:1] / depth
    y = c - f * (pw[:, 1:2] - CAM_Y) / depth
    return torch.cat([x, y], 1), depth


def _pixel_angle(resolution: int) -> float:
    return 1.0 / _focal(resolution)


def _rays(resolution: int, device) -> Tensor:
    """Unit ray directions (H*W, 3) in the camera frame, row-major pixels."""
    r = torch.arange(resolution, device=device, dtype=torch.float32)
    c, f = (resolution - 1) / 2, _focal(resolution)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    d = torch.stack([(xx - c) / f, -(yy - c) / f, -torch.ones_like(xx)], -1).view(-1, 3)
    return F.normalize(d, dim=-1)


def _box(o: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Slab test of rays (origin o (N,3), direction d (N,3)) against the canonical box."""
    lo = torch.tensor(hm.BOX_LO, device=o.device)
    hi = torch.tensor(hm.BOX_HI, device=o.device)
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    ta, tb = (lo - o) * inv, (hi - o) * inv
    return torch.minimum(ta, tb).amax(-1).clamp_min(0), torch.maximum(ta, tb).amin(-1)


def _trace(o: Tensor, d: Tensor, t0: Tensor, t1: Tensor, g: dict, b: Tensor, pix: float,
           loose: bool = False) -> Tensor:
    """Sphere-trace rays; returns the hit distance per ray (inf for a miss).

    A ray stops when the surface is closer than HIT_PX of a pixel's footprint (cone-tracing
    style: grazing rays that pass within a fraction of a pixel count as hits instead of
    crawling along the silhouette); ``render`` then polishes hits onto the surface. ``pix`` is
    the angle of one pixel; ``loose`` also keeps near misses (for the coarse pre-pass).
    """
    n = o.shape[0]
    t_hit = torch.full((n,), float("inf"), device=o.device)
    alive = torch.arange(n, device=o.device)
    gg = hm.gather(g, b, hm.SDF_KEYS)
    t = t0.clone()
    for step in range(STEPS):
        dist = hm.head_sdf(o + t[:, None] * d, gg)
        t = t + dist
        if (step + 1) % COMPACT:
            continue
        last = step + 1 >= STEPS or (step + 1 >= 3 * COMPACT and t.numel() < 2e-3 * n + 8)
        thr = (1.0 if last else HIT_PX) * pix * t
        hit = dist < (thr.clamp_min(PRE_MARGIN / 2) if loose and last else thr)
        t_hit[alive[hit]] = t[hit]
        keep = ~hit & (t < t1)
        if last or not bool(keep.any()):
            break
        k = keep.nonzero().squeeze(1)
        alive, o, d, t, t1 = alive[k], o[k], d[k], t[k], t1[k]
        gg = hm.gather(gg, k)
    return t_hit


def _coarse_start(o_c: Tensor, rot: Tensor, g: dict, resolution: int) -> Tensor:
    """Per-ray start distance from a 1/PRE-resolution pre-pass (B*H*W,), inf where no surface.

    Each full-resolution ray starts at the nearest coarse hit in the 3x3 coarse neighbourhood
    of its pixel, minus a margin: background rays are dropped and the rest begin next to the
    surface. A feature thinner than ~2 coarse pixels (> 1.5 cm at 128 px) could be missed;
    the head has none (tests compare against the full trace).
    """
    bsz, lr = o_c.shape[0], -(-resolution // PRE)
    d = (_rays(lr, o_c.device) @ rot).reshape(-1, 3)
    o = o_c[:, None].expand(bsz, lr * lr, 3).reshape(-1, 3)
    t0, t1 = _box(o, d)
    cand = (t1 > t0).nonzero().squeeze(1)
    t = torch.full((bsz * lr * lr,), float("inf"), device=o.device)
    t[cand] = _trace(o[cand], d[cand], t0[cand], t1[cand], g,
                     torch.div(cand, lr * lr, rounding_mode="floor"), _pixel_angle(lr), loose=True)
    t = -F.max_pool2d(-t.view(bsz, 1, lr, lr), 3, 1, 1)
    idx = ((torch.arange(resolution, device=o.device) + 0.5) * lr / resolution).long()
    t = t[:, 0][:, idx][:, :, idx]
    return (t - PRE_MARGIN).reshape(-1)


def _ambient_occlusion(p: Tensor, n: Tensor, g: dict) -> Tensor:
    occ = torch.zeros_like(p[:, 0])
    for i, h in enumerate((0.04, 0.12)):
        occ = occ + (h - hm.head_sdf(p + n * h, g)).clamp_min(0) / (i + 1)
    return (1 - 2.0 * occ).clamp(0.25, 1.0)


def _soft_shadow(p: Tensor, n: Tensor, l: Tensor, g: dict, steps: int = 8) -> Tensor:
    res = torch.ones_like(p[:, 0])
    s = torch.full_like(res, 0.03)
    q = p + n * 0.01
    for _ in range(steps):
        h = hm.head_sdf(q + l * s[:, None], g)
        res = torch.minimum(res, 10 * h / s)
        s = s + h.clamp(0.03, 0.3)
    return res.clamp(0, 1)


def _background(bg: Tensor, resolution: int) -> Tensor:
    r = torch.linspace(-1, 1, resolution, device=bg.device)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    a = bg[:, 6].view(-1, 1, 1)
    t = (0.5 + 0.5 * (yy * a.cos() + xx * a.sin())).clamp(0, 1)[:, None]
    return bg[:, :3, None, None] * (1 - t) + bg[:, 3:6, None, None] * t


def _check(identity, pose, light, background, resolution):
    b = identity.shape[0] if identity.dim() == 2 else -1
    want = {"identity": (identity, IDENTITY_DIM), "pose": (pose, 3), "light": (light, LIGHT_DIM),
            "background": (background, BACKGROUND_DIM)}
    for name, (x, k) in want.items():
        if x.dim() != 2 or x.shape != (b, k):
            raise DataError(f"render: {name} has shape {tuple(x.shape)}, expected ({b}, {k}); "
                            "stack per-view parameters from sample_identity/sample_view")
    if not isinstance(resolution, int) or resolution < 8:
        raise DataError(f"render: resolution={resolution!r} must be an int >= 8")


def render(identity: Tensor, pose: Tensor, light: Tensor, background: Tensor,
           resolution: int) -> dict[str, Tensor]:
    """Render a batch of heads. All inputs (B, k) on one device; outputs are on that device.

    Keys: rgb (B,3,H,W) in [0,1] sRGB; fg (B,1,H,W) {0,1}; coords (B,3,H,W) canonical surface
    point (0 on background); depth (B,1,H,W) camera-axis distance (0 on background); normals
    (B,3,H,W) camera frame; landmarks (B,K,2) pixel xy; landmarks_visible (B,K) bool.
    """
    _check(identity, pose, light, background, resolution)
    dev = identity.device
    identity, pose, light, background = (x.float() for x in (identity, pose, light, background))
    bsz, hw = identity.shape[0], resolution * resolution
    g = hm.build_geometry(identity)
    rot = rotation_matrix(pose)                                    # canonical -> camera
    cam = torch.tensor([0.0, CAM_Y, CAM_DIST], device=dev)
    o_c = torch.einsum("bji,j->bi", rot, cam)                      # R^T cam
    d_c = _rays(resolution, dev) @ rot                             # (B, HW, 3) = R^T d
    o_all = o_c[:, None].expand(bsz, hw, 3).reshape(-1, 3)
    d_all = d_c.reshape(-1, 3)
    t0, t1 = _box(o_all, d_all)
    if resolution >= 4 * PRE:
        t0 = torch.maximum(t0, _coarse_start(o_c, rot, g, resolution))
    cand = (t1 > t0).nonzero().squeeze(1)
    bidx = torch.div(cand, hw, rounding_mode="floor")
    t_hit = _trace(o_all[cand], d_all[cand], t0[cand], t1[cand], g, bidx, _pixel_angle(resolution))
    ok = torch.isfinite(t_hit)
    pix, bidx, t_hit = cand[ok], bidx[ok], t_hit[ok]
    gg = hm.gather(g, bidx)
    o_h, d_h = o_all[pix], d_all[pix]
    p = o_h + t_hit[:, None] * d_h
    n_c = hm.sdf_normal(p, gg)
    # polish: two Newton steps along the pixel's own ray, so coords stay on that ray
    cos = (-(n_c * d_h).sum(-1)).clamp_min(0.25)
    t_hit = t_hit + hm.head_sdf(p, gg) / cos
    p = o_h + t_hit[:, None] * d_h
    dist, parts = hm.head_sdf(p, gg, parts=True)
    t_hit = t_hit + dist / cos
    p = o_h + t_hit[:, None] * d_h
    alb, spec_w, shin = albedo(p, n_c, parts, gg, identity.index_select(0, bidx))
    # shading in the camera frame
    r = rot.index_select(0, bidx)
    n_w = torch.einsum("nij,nj->ni", r, n_c)
    p_w = torch.einsum("nij,nj->ni", r, p)
    lt = light.index_select(0, bidx)
    e_full, e_amb = irradiance(lt, n_w), ambient(lt)
    l_dir, l_str = dominant(lt)
    l_c = torch.einsum("nji,nj->ni", r, l_dir)                     # light direction, canonical
    # cast shadows only matter where the light's direct part is positive: trace only there
    lit = ((e_full > e_amb).any(-1) & (l_str > 1e-6)).nonzero().squeeze(1)
    shadow = torch.zeros_like(l_str)
    shadow[lit] = _soft_shadow(p[lit], n_c[lit], l_c[lit], hm.gather(gg, lit, hm.SDF_KEYS))
    e = e_amb + (e_full - e_amb) * torch.where(e_full > e_amb, shadow[:, None], torch.ones_like(e_full))
    ao = _ambient_occlusion(p, n_c, gg)
    view = F.normalize(cam - p_w, dim=-1)
    half = F.normalize(view + l_dir, dim=-1)
    ndh = (n_w * half).sum(-1).clamp_min(0)
    spec = spec_w * l_str * ndh.pow(shin) * (shin + 8) / 8 * 0.35 * shadow * (n_w * l_dir).sum(-1).gt(0)
    lin = alb * e * ao[:, None] + spec[:, None]
    srgb = (1 - torch.exp(-1.1 * lin)).clamp(0, 1) ** (1 / 2.2) * 1.05   # soft shoulder, gamma
    # scatter into images
    def canvas(vals: Tensor) -> Tensor:
        out = torch.zeros(bsz * hw, vals.shape[1], device=dev)
        out[pix] = vals
        return out.view(bsz, resolution, resolution, -1).permute(0, 3, 1, 2).contiguous()
    fg = canvas(torch.ones_like(t_hit)[:, None])
    coords = canvas(p)
    depth = canvas((CAM_DIST - p_w[:, 2])[:, None])
    normals = canvas(n_w)
    rgb = canvas(srgb.clamp(0, 1)) + (1 - fg) * _background(background, resolution)
    lm, vis = _landmarks(g, pose, resolution, depth, fg)
    return {"rgb": rgb.clamp(0, 1), "fg": fg, "coords": coords, "depth": depth,
            "normals": normals, "landmarks": lm, "landmarks_visible": vis}


def _landmarks(g: dict, pose: Tensor, resolution: int, depth: Tensor, fg: Tensor):
    """Landmarks snapped onto the surface, projected, and z-tested against the render."""
    bsz = pose.shape[0]
    pts = hm.canonical_landmarks(g).reshape(-1, 3)
    gg = hm.gather(g, torch.arange(bsz, device=pose.device).repeat_interleave(NUM_LANDMARKS))
    for _ in range(3):  # Newton steps onto the zero level set
        pts = pts - hm.head_sdf(pts, gg)[:, None] * hm.sdf_normal(pts, gg)
    pts = pts.view(bsz, NUM_LANDMARKS, 3).permute(0, 2, 1)
    xy, dz = project(pts, pose, resolution)
    xy, dz = xy.permute(0, 2, 1), dz[:, 0]
    px = xy.round().long().clamp(0, resolution - 1)
    inside = (xy >= -0.5).all(-1) & (xy <= resolution - 0.5).all(-1)
    bi = torch.arange(bsz, device=pose.device)[:, None]
    seen = depth[bi, 0, px[..., 1], px[..., 0]]
    vis = inside & (fg[bi, 0, px[..., 1], px[..., 0]] > 0) & (dz <= seen + 0.05)
    return xy, vis


def ground_truth_flow(target: dict, profile: dict, profile_pose: Tensor, resolution: int,
                      depth_tol: float = 0.03) -> tuple[Tensor, Tensor]:
    """Dense flow target -> profile in pixels (B, 2, H, W) and its validity (B, 1, H, W).

    ``target``/``profile`` are render outputs (need coords+fg / depth+fg). A target pixel is
    valid when it is foreground, its surface point projects inside the profile image, lands on
    profile foreground, and is not hidden there: its depth in the profile camera is within
    ``depth_tol`` (canonical units, 3 mm by default) of the profile's depth map, sampled
    bilinearly with the background treated as infinitely far.
    """
    coords, fg = target["coords"], target["fg"]
    xy, dz = project(coords, profile_pose, resolution)
    h = w = resolution
    ys, xs = torch.meshgrid(torch.arange(h, device=coords.device, dtype=coords.dtype),
                            torch.arange(w, device=coords.device, dtype=coords.dtype), indexing="ij")
    flow = (xy - torch.stack([xs, ys])[None]) * fg
    grid = (xy / (resolution - 1) * 2 - 1).permute(0, 2, 3, 1)
    far = profile["depth"] + (1 - profile["fg"]) * 1e3
    d_prof = F.grid_sample(far, grid, mode="bilinear", align_corners=True, padding_mode="border")
    fg_prof = F.grid_sample(profile["fg"], grid, mode="bilinear", align_corners=True)
    inside = ((xy >= 0) & (xy <= resolution - 1)).all(1, keepdim=True)
    valid = (fg > 0.5) & inside & (fg_prof > 0.5) & (dz <= d_prof + depth_tol)
    return flow * valid, valid.float()


def render_group(identity_index: int, num_views: int, resolution: int, seed: int,
                 device="cpu", **view_kwargs) -> dict[str, Tensor]:
    """All ``num_views`` views of one identity, stacked on dim 0 (see ``render``'s keys), plus
    "pose", "light", "background", "identity" (num_views, IDENTITY_DIM) parameters and
    "identity_index" (num_views,) int64. ``view_kwargs`` go to ``sample_view`` (pose ranges)."""
    ident = sample_identity(identity_index, seed)
    views = [sample_view(identity_index, v, seed, **view_kwargs) for v in range(num_views)]
    pose, light, bg = (torch.stack(x).to(device) for x in zip(*views))
    ident = ident[None].expand(num_views, -1).contiguous().to(device)
    out = render(ident, pose, light, bg, resolution)
    out.update(pose=pose, light=light, background=bg, identity=ident,
               identity_index=torch.full((num_views,), identity_index, dtype=torch.long,
                                         device=device))
    return out
