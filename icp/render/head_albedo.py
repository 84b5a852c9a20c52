"""Surface appearance of the procedural head: albedo and specularity at canonical points.

Everything is painted in the canonical frame from the identity parameters, so a surface point
keeps its colour in every pose (the ground-truth flow relies on this: only shading changes).
Palettes are sRGB values chosen by eye from photographs; they are converted to linear light
here because shading is done in linear light.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from icp.render.head_model import EYE_R, decode_identity

SKIN = ((0.97, 0.82, 0.72), (0.90, 0.70, 0.57), (0.80, 0.58, 0.43), (0.64, 0.44, 0.30),
        (0.45, 0.30, 0.20), (0.30, 0.19, 0.13))
HAIR = ((0.04, 0.035, 0.03), (0.12, 0.08, 0.05), (0.28, 0.17, 0.09), (0.42, 0.26, 0.13),
        (0.55, 0.25, 0.10), (0.76, 0.60, 0.36), (0.88, 0.78, 0.55), (0.62, 0.60, 0.58))
IRIS = ((0.16, 0.09, 0.04), (0.33, 0.18, 0.08), (0.40, 0.33, 0.14), (0.30, 0.42, 0.24),
        (0.30, 0.45, 0.62), (0.48, 0.55, 0.62))
CLOTH = ((0.10, 0.12, 0.25), (0.08, 0.08, 0.08), (0.85, 0.85, 0.82), (0.45, 0.47, 0.50),
         (0.45, 0.10, 0.12), (0.15, 0.35, 0.22), (0.75, 0.65, 0.50), (0.25, 0.45, 0.70))


def ramp(t: Tensor, palette: tuple, device) -> Tensor:
    """Piecewise-linear colour ramp: t (N,) in [0, 1] -> (N, 3) linear-light colour."""
    pal = torch.tensor(palette, dtype=torch.float32, device=device) ** 2.2
    x = t.clamp(0, 1) * (len(palette) - 1)
    i0 = x.floor().long().clamp(max=len(palette) - 2)
    w = (x - i0)[:, None]
    return pal[i0] * (1 - w) + pal[i0 + 1] * w


def _noise(p: Tensor, freq: float) -> Tensor:
    """Cheap deterministic pseudo-noise in [-1, 1] from sums of incommensurate sines."""
    a = torch.tensor([[1.0, 1.7, 0.3], [-0.6, 0.9, 1.9], [1.3, -0.4, 1.1]], device=p.device)
    s = torch.sin(freq * p @ a.T + torch.tensor([0.3, 1.9, 4.1], device=p.device))
    return s.mean(-1)


def _band(v: Tensor, half: Tensor | float, soft: float) -> Tensor:
    """1 inside |v| < half, fading to 0 over ``soft``."""
    return ((half - v.abs()) / soft + 0.5).clamp(0, 1)


def albedo(p: Tensor, n: Tensor, parts: dict[str, Tensor], g: dict[str, Tensor],
           identity: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Linear albedo (N, 3), specular weight (N,) and shininess (N,) at canonical hit points.

    p, n: canonical points and normals (N, 3); parts: head_sdf's material distances at p;
    g: gathered geometry; identity: gathered (N, IDENTITY_DIM) parameters.
    """
    dev = p.device
    f = decode_identity(identity)
    x, y, z = p.unbind(-1)
    ax = x.abs()
    # --- skin: tone ramp, undertone, mottling, blush, eyelid shadow
    skin = ramp(f["skin_tone"], SKIN, dev)
    under = (f["skin_under"] - 0.5)[:, None] * torch.tensor([0.06, 0.0, -0.08], device=dev)
    skin = skin * (1 + under)
    skin = skin * (1 + 0.04 * _noise(p, 40.0))[:, None]
    cheek = g["cheek_c"]
    wb = torch.exp(-((ax - cheek[:, 0]) ** 2 + (y - cheek[:, 1]) ** 2) / 0.025) * f["blush"]
    skin = skin * (1 - 0.25 * wb[:, None] * torch.tensor([0.0, 0.6, 0.5], device=dev))
    ex, ey = g["eye_c"][:, 0], g["eye_c"][:, 1]
    # eye-socket shadow (upper lid crease and under-eye), which real faces show in any light
    lid = torch.exp(-((ax - ex) ** 2 / 0.025 + (y - ey - 0.06) ** 2 / 0.004))
    bags = torch.exp(-((ax - ex - 0.02) ** 2 / 0.02 + (y - ey + 0.1) ** 2 / 0.002))
    skin = skin * (1 - 0.35 * lid - 0.12 * bags)[:, None]
    hair_col = ramp(f["hair_hue"] ** 1.3, HAIR, dev) * (0.7 + 0.6 * f["hair_light"])[:, None]
    hair_col = hair_col.clamp(max=1.0)
    # beard / stubble for the upper part of the "beard" range: below the nose, above the jaw
    # line, on the front half of the face; the lips stay bare (painted over below)
    my = g["mouth"][:, 1]
    wbeard = ((f["beard"] - 0.6) / 0.4).clamp(0, 1)
    chin_lo = g["chin_c"][:, 1] - g["chin_r"][:, 0] - 0.02
    zone = (((g["tip_c"][:, 1] - 0.09 - 0.3 * (ax - 0.1).clamp_min(0) - y) / 0.06).clamp(0, 1) * ((y - chin_lo) / 0.05).clamp(0, 1)
            * ((z - 0.05) / 0.15).clamp(0, 1) * ((0.75 - ax) / 0.1).clamp(0, 1))
    wz = (0.75 * wbeard * zone * (0.75 + 0.25 * _noise(p, 35.0)))[:, None]
    skin = skin * (1 - wz) + hair_col * 0.6 * wz  # facial hair reads darker than scalp hair
    # --- lips and mouth line
    wl = (1 - parts["lips"] / 0.015).clamp(0, 1) * (z > g["mouth"][:, 2] - 0.12).float()
    lipc = skin * torch.tensor([0.78, 0.47, 0.47], device=dev) \
        * (1 - 0.35 * f["lip_tint"][:, None] * torch.tensor([0.0, 0.5, 0.4], device=dev))
    col = skin * (1 - wl[:, None]) + lipc * wl[:, None]
    mline = _band(y - my, 0.008, 0.008) * (ax < g["mouth"][:, 0] * 0.97).float() \
        * (z > g["mouth"][:, 2] - 0.12).float()
    col = col * (1 - 0.85 * mline)[:, None]
    # --- nostrils: dark openings under the alae
    nos = g["nostril_c"]
    dn = ((ax - nos[:, 0]) ** 2 / 0.03 ** 2 + (y - nos[:, 1]) ** 2 / 0.025 ** 2
          + (z - nos[:, 2]) ** 2 / 0.05 ** 2)
    col = col * (1 - 0.85 * (1.5 - dn).clamp(0, 1))[:, None]
    # --- eyebrows: an arched band above each eye, hair coloured
    t = (ax - (ex - 0.12)) / 0.27
    arch = f["brow_arch"] * torch.sin(math.pi * t.clamp(0, 1) ** 0.8)
    yb = ey + 0.135 + 0.04 * t.clamp(0, 1) * 0 + arch - 0.02 * t.clamp(0, 1) ** 2
    thick = f["brow_thick"] * (1.25 - 0.7 * t.clamp(0, 1))
    wbrow = _band(y - yb, thick, 0.012) * ((t > -0.05) & (t < 1.0)).float() * (z > 0.3).float()
    browc = hair_col * (0.35 + 0.4 * (1 - f["brow_dark"]))[:, None]
    wbrow = wbrow * (0.8 + 0.2 * _noise(p, 60.0))
    col = col * (1 - wbrow[:, None]) + browc * wbrow[:, None]
    spec = 0.05 + 0.08 * wl
    shin = torch.full_like(spec, 18.0) + 20 * wl
    # --- eyes: sclera, iris, pupil inside an almond opening; eyelid (skin) outside it
    q = (torch.stack([ax, y, z], -1) - g["eye_c"]) / EYE_R
    yq = q[:, 1] - f["eye_tilt"] * q[:, 0]
    half = f["eye_open"] * (1 - (q[:, 0] / f["eye_w"]) ** 2).clamp_min(0) + 0.05 * (q[:, 0] < 0)
    upper = yq > 0
    open_ = (yq.abs() < half) & (q[:, 2] > 0)
    rr = q[:, :2].norm(dim=-1)
    iris_col = ramp(f["iris_hue"], IRIS, dev) * (1.1 - 0.5 * f["iris_dark"])[:, None]
    iris_col = iris_col * (0.75 + 0.5 * rr / 0.45)[:, None] * (1 + 0.2 * torch.sin(rr * 0 + 40 * torch.atan2(q[:, 1], q[:, 0])))[:, None]
    sclera = torch.tensor([0.80, 0.76, 0.72], device=dev) ** 2.2 * (1 - 0.3 * (q[:, 0].abs() > 0.6).float())[:, None]
    eyec = torch.where((rr < 0.44)[:, None], iris_col, sclera)
    eyec = torch.where((rr < 0.40)[:, None] & (rr > 0.37)[:, None], iris_col * 0.4, eyec)
    eyec = torch.where((rr < 0.17)[:, None], torch.full_like(eyec, 0.005), eyec)
    edge = half - yq.abs()
    lash = (edge < torch.where(upper, 0.16, 0.06)).float() * (1 - 0.4 * (~upper).float())
    eyec = eyec * (1 - 0.95 * lash)[:, None]
    lidc = skin * 0.8
    eyec = torch.where(open_[:, None], eyec, lidc)
    e_spec = torch.where(open_, torch.full_like(spec, 0.9), torch.full_like(spec, 0.04))
    e_shin = torch.where(open_, torch.full_like(spec, 250.0), torch.full_like(spec, 15.0))
    # --- hair: strands run along meridians from the crown
    strand = torch.sin(22 * torch.atan2(x, z + 0.3) + 3 * _noise(p, 5.0)) * 0.5 + 0.5
    hairc = hair_col * (0.75 + 0.25 * strand + 0.12 * _noise(p, 12.0))[:, None]
    # --- clothing
    clothc = ramp(f["cloth_hue"], CLOTH, dev) * (0.5 + 0.6 * f["cloth_val"])[:, None]
    # --- materials: hard choice of the nearest group, soft blend at the hairline
    dmin = torch.stack([parts["skin"], parts["eye"], parts["hair"], parts["cloth"]], -1)
    mat = dmin.argmin(-1)
    out = torch.where((mat == 1)[:, None], eyec, col)
    out = torch.where((mat == 2)[:, None], hairc, out)
    out = torch.where((mat == 3)[:, None], clothc, out)
    spec = torch.where(mat == 1, e_spec, spec)
    shin = torch.where(mat == 1, e_shin, shin)
    spec = torch.where(mat == 2, torch.full_like(spec, 0.03), spec)
    shin = torch.where(mat == 2, torch.full_like(spec, 8.0), shin)
    spec = torch.where(mat == 3, torch.full_like(spec, 0.02), spec)
    return out.clamp(0, 1), spec, shin
