"""The procedural head: identity parameters -> geometry (a signed distance function).

An identity is a vector of ``IDENTITY_DIM`` numbers in [0, 1], one per named field below; each
field maps linearly onto a physical range. The head lives in a *canonical frame* (units of
10 cm): x to the subject's left (image right at yaw 0), y up, z out of the face, origin between
the eyes inside the skull. The surface is a smooth union of ellipsoids, spheres and capsules
(``smin``), so it is a continuous SDF that a sphere tracer can march and whose gradient gives
normals. Pure tensor functions throughout: ``build_geometry`` turns (B, IDENTITY_DIM) parameters
into a dict of (B, k) tensors, ``head_sdf`` evaluates points given that dict gathered per point.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (name, low, high): identity[..., i] in [0, 1] maps to low + u * (high - low).
IDENTITY_FIELDS: tuple[tuple[str, float, float], ...] = (
    ("head_w", 0.64, 0.82), ("head_h", 0.86, 0.98), ("head_d", 0.88, 1.00),
    ("jaw_w", 0.46, 0.68), ("jaw_h", 0.42, 0.60), ("chin_r", 0.12, 0.24),
    ("chin_fwd", -0.06, 0.08), ("cheek", 0.0, 1.0), ("brow_ridge", 0.0, 1.0),
    ("eye_sep", 0.27, 0.36), ("eye_y", -0.07, 0.08), ("eye_open", 0.20, 0.42),
    ("eye_w", 0.80, 0.98), ("eye_tilt", -0.15, 0.25), ("nose_len", 0.30, 0.54),
    ("nose_w", 0.08, 0.15), ("nose_proj", 0.14, 0.34), ("nose_tip_r", 0.065, 0.10),
    ("mouth_y", -0.78, -0.58), ("lip_w", 0.17, 0.31), ("lip_up", 0.035, 0.065),
    ("lip_lo", 0.045, 0.085), ("ear_size", 0.24, 0.31), ("ear_out", 0.0, 1.0),
    ("neck_w", 0.36, 0.50), ("skin_tone", 0.0, 1.0), ("skin_under", 0.0, 1.0),
    ("blush", 0.0, 1.0), ("lip_tint", 0.0, 1.0), ("iris_hue", 0.0, 1.0),
    ("iris_dark", 0.0, 1.0), ("hair_hue", 0.0, 1.0), ("hair_light", 0.0, 1.0),
    ("brow_thick", 0.024, 0.048), ("brow_arch", 0.0, 0.07), ("brow_dark", 0.0, 1.0),
    ("hair_len", 0.0, 1.0), ("hair_vol", 0.03, 0.13), ("hairline", 0.55, 0.78),
    ("recession", 0.0, 1.0), ("part", -1.0, 1.0), ("beard", 0.0, 1.0),
    ("cloth_hue", 0.0, 1.0), ("cloth_val", 0.0, 1.0), ("fringe", 0.0, 1.0),
    ("face_len", 0.90, 1.14),
)
IDENTITY_DIM = len(IDENTITY_FIELDS)
FIELD_INDEX = {name: i for i, (name, _, _) in enumerate(IDENTITY_FIELDS)}
# Fields that move together with a shared "masculinity" latent in sample_identity (sign = +1 grows
# with it), so that jaw, brow ridge, beard and hair length co-vary as in real faces.
MASCULINE = {"jaw_w": 1, "brow_ridge": 1, "beard": 1, "chin_r": 1, "nose_w": 1, "hair_len": -1,
             "lip_up": -1, "lip_lo": -1, "eye_open": -1, "head_w": 1, "neck_w": 1, "fringe": -1,
             "recession": 1, "blush": -1, "lip_tint": -1, "brow_thick": 1}

EYE_R = 0.12  # eyeball radius: 12 mm, nearly constant across adults
# Canonical bounding box of everything (head, hair, neck, shoulders), used to start/stop rays.
BOX_LO = (-1.95, -3.0, -1.45)
BOX_HI = (1.95, 1.40, 1.50)


def decode_identity(identity: Tensor) -> dict[str, Tensor]:
    """(B, IDENTITY_DIM) in [0, 1] -> {field: (B,)} in physical units."""
    u = identity.clamp(0.0, 1.0)
    return {n: lo + u[:, i] * (hi - lo) for i, (n, lo, hi) in enumerate(IDENTITY_FIELDS)}


def _vec(*cols: Tensor | float, like: Tensor) -> Tensor:
    return torch.stack([c if torch.is_tensor(c) else torch.full_like(like, c) for c in cols], -1)


def _face_z(x: Tensor | float, y: Tensor, c: Tensor, r: Tensor) -> Tensor:
    """Front surface depth of the face ellipsoid at (x, y): used to place features on it."""
    q = 1 - ((x - c[:, 0]) / r[:, 0]) ** 2 - ((y - c[:, 1]) / r[:, 1]) ** 2
    return c[:, 2] + r[:, 2] * q.clamp_min(0.05).sqrt()


def build_geometry(identity: Tensor) -> dict[str, Tensor]:
    """Per-identity primitive centres/radii, each (B, k). Features mirrored in x use +x copies."""
    f = decode_identity(identity)
    z0 = torch.zeros_like(f["head_w"])
    fl = f["face_len"]
    g: dict[str, Tensor] = {}
    g["cran_c"] = _vec(0.0, 0.18, -0.12, like=z0)
    g["cran_r"] = _vec(f["head_w"], f["head_h"], f["head_d"], like=z0)
    g["face_c"] = _vec(0.0, -0.28 * fl, 0.06, like=z0)
    g["face_r"] = _vec(f["jaw_w"] + 0.13, 0.86 * fl, 0.80, like=z0)
    g["jaw_c"] = _vec(0.0, -0.72 * fl, 0.02, like=z0)
    g["jaw_r"] = _vec(f["jaw_w"], f["jaw_h"] * fl, 0.66, like=z0)
    chin_y = -1.08 * fl + f["chin_r"]
    g["chin_c"] = _vec(z0, chin_y, _face_z(0.0, chin_y, g["face_c"], g["face_r"]) - f["chin_r"]
                       + f["chin_fwd"] - 0.02, like=z0)
    g["chin_r"] = f["chin_r"][:, None]
    # cheekbones (paper-free anatomy): below and outside the eyes
    cy = f["eye_y"] - 0.22
    cx = f["eye_sep"] + 0.10
    g["cheek_c"] = _vec(cx, cy, _face_z(cx, cy, g["face_c"], g["face_r"]) - 0.17, like=z0)
    g["cheek_r"] = _vec(0.19 + 0.07 * f["cheek"], 0.15, 0.17 + 0.05 * f["cheek"], like=z0)
    # eyes: eyeball centre set back so ~45% of its radius sits in front of the face surface
    ex, ey = f["eye_sep"], f["eye_y"]
    ez = _face_z(ex, ey, g["face_c"], g["face_r"])
    g["eye_c"] = _vec(ex, ey, ez - 0.6 * EYE_R, like=z0)
    g["socket_c"] = _vec(ex, ey + 0.01, ez + 0.02, like=z0)
    g["socket_r"] = _vec(0.20 + 0.0 * z0, 0.14 + 0.0 * z0, 0.14 + 0.0 * z0, like=z0)
    by = ey + 0.15
    g["brow_c"] = _vec(ex + 0.02, by, _face_z(ex, by, g["face_c"], g["face_r"]) - 0.09, like=z0)
    g["brow_r"] = _vec(0.22 + 0.0 * z0, 0.07 + 0.02 * f["brow_ridge"], 0.10 + 0.0 * z0, like=z0)
    g["brow_k"] = (0.02 + 0.06 * f["brow_ridge"])[:, None]
    # nose: a tapered capsule from the bridge to the tip, a tip sphere, two alae
    nz = _face_z(0.0, ey, g["face_c"], g["face_r"])
    tip_y = ey - f["nose_len"]
    tz = _face_z(0.0, tip_y, g["face_c"], g["face_r"])
    g["nose_a"] = _vec(z0, ey + 0.02, nz - 0.035, like=z0)
    g["nose_b"] = _vec(z0, tip_y + 0.02, tz + f["nose_proj"] - f["nose_tip_r"] - 0.02, like=z0)
    g["nose_ra"] = torch.full_like(z0, 0.045)[:, None]
    g["nose_rb"] = (f["nose_tip_r"] * 0.75)[:, None]
    g["tip_c"] = _vec(z0, tip_y, tz + f["nose_proj"] - f["nose_tip_r"], like=z0)
    g["tip_r"] = f["nose_tip_r"][:, None]
    ay = tip_y + 0.005
    g["ala_c"] = _vec(f["nose_w"], ay, _face_z(f["nose_w"], ay, g["face_c"], g["face_r"])
                      + 0.3 * f["nose_proj"] - 0.06, like=z0)
    g["ala_r"] = _vec(0.055 + 0.0 * z0, 0.05 + 0.0 * z0, 0.07 + 0.0 * z0, like=z0)
    g["nostril_c"] = _vec(0.55 * f["nose_w"], tip_y - 0.055, g["ala_c"][:, 2] + 0.04, like=z0)
    # lips: two flattened ellipsoids above/below the mouth line
    my = f["mouth_y"] * fl
    mz = _face_z(0.0, my, g["face_c"], g["face_r"])
    g["mouth"] = _vec(f["lip_w"], my, mz + 0.01, like=z0)
    g["lipu_c"] = _vec(z0, my + 0.55 * f["lip_up"], mz - 0.035, like=z0)
    g["lipu_r"] = _vec(f["lip_w"], f["lip_up"], 0.085 + 0.0 * z0, like=z0)
    g["lipl_c"] = _vec(z0, my - 0.6 * f["lip_lo"], mz - 0.045, like=z0)
    g["lipl_r"] = _vec(f["lip_w"] * 0.9, f["lip_lo"], 0.085 + 0.0 * z0, like=z0)
    # ears on the sides, flattened, tilted back by ear_out
    g["ear_c"] = _vec(f["head_w"] - 0.05 + 0.03 * f["ear_out"], ey - 0.14, -0.14 + 0.0 * z0, like=z0)
    g["ear_r"] = _vec(0.045 + 0.02 * f["ear_out"], f["ear_size"], 0.15 + 0.0 * z0, like=z0)
    # neck and shoulders
    g["neck_a"] = _vec(z0, -0.55 + 0.0 * z0, -0.22 + 0.0 * z0, like=z0)
    g["neck_b"] = _vec(z0, -2.2 + 0.0 * z0, -0.28 + 0.0 * z0, like=z0)
    g["neck_r"] = f["neck_w"][:, None]
    g["torso_c"] = _vec(z0, -2.75 + 0.0 * z0, -0.30 + 0.0 * z0, like=z0)
    g["torso_r"] = _vec(1.75 + 0.15 * f["head_w"], 1.05 + 0.0 * z0, 0.85 + 0.0 * z0, like=z0)
    # hair: a shell over the cranium, cut below a tilted hairline plane; long hair hangs behind
    g["hair_r"] = g["cran_r"] + f["hair_vol"][:, None] * torch.tensor([1.0, 1.3, 1.0],
                                                                         device=z0.device)
    g["hair_par"] = torch.stack([f["hairline"], f["recession"], f["part"], f["fringe"],
                                 f["hair_len"], f["hair_vol"]], -1)
    g["long_c"] = _vec(z0, -0.25 - 0.45 * f["hair_len"], -0.32 + 0.0 * z0, like=z0)
    g["long_r"] = _vec(f["head_w"] + f["hair_vol"] + 0.02, 0.55 + 0.75 * f["hair_len"],
                       0.72 + 0.0 * z0, like=z0)
    pack_ellipsoids(g)
    return g


# -- SDF primitives (points (N, 3); parameters gathered to (N, k)) ---------------------------
def sd_capsule(p: Tensor, a: Tensor, b: Tensor, ra: Tensor, rb: Tensor) -> Tensor:
    """Capsule with radius linear along its axis (a tapered cylinder with round ends)."""
    ba = b - a
    h = (((p - a) * ba).sum(-1) / (ba * ba).sum(-1).clamp_min(1e-9)).clamp(0, 1)
    r = ra.squeeze(-1) + h * (rb - ra).squeeze(-1)
    return (p - a - h[:, None] * ba).norm(dim=-1) - r


def smin(a: Tensor, b: Tensor, k: Tensor | float) -> Tensor:
    """Polynomial smooth minimum (blends two surfaces over a band of width k)."""
    h = (k - (a - b).abs()).clamp_min(0)
    return torch.minimum(a, b) - h * h / (4 * k)


def smax(a: Tensor, b: Tensor, k: Tensor | float) -> Tensor:
    return -smin(-a, -b, k)


def hair_cut(p: Tensor, par: Tensor) -> Tensor:
    """Signed distance-like value to the hair region's lower boundary: < 0 inside the hair.

    The hairline is a plane tilted down towards the back of the head (so hair covers the crown
    and back but not the face); recession lifts it at the temples, fringe lowers it mid-front,
    part makes it asymmetric, and long hair lowers the back edge.
    """
    x, y, z = p.unbind(-1)
    hl, rec, part, fringe, length = par[:, 0], par[:, 1], par[:, 2], par[:, 3], par[:, 4]
    front = hl + 0.9 * rec * x * x - fringe * 0.35 * torch.exp(-((x - 0.12 * part) ** 2) / 0.08)
    front = front + 0.05 * part * x
    slope = 0.45 + 0.35 * length
    line = front - (0.95 - z).clamp_min(0) * slope
    return (line - y) * 0.8


# Ellipsoids evaluated together in one vectorised pass (spheres are ellipsoids with equal radii:
# the formula is then exact). MIRRORED ones use |x|, so one copy serves both sides.
ELLIPSOIDS = ("cran", "face", "jaw", "cheek", "brow", "socket", "ala", "lipu", "lipl", "ear",
              "torso", "hair", "long", "chin", "tip", "eye")
MIRRORED = ("cheek", "brow", "socket", "ala", "ear", "eye")
SDF_KEYS = ("ell_c", "ell_r", "nose_a", "nose_b", "nose_ra", "nose_rb", "neck_a", "neck_b",
            "neck_r", "brow_k", "hair_par")
_E = {name: i for i, name in enumerate(ELLIPSOIDS)}


def pack_ellipsoids(g: dict[str, Tensor]) -> None:
    """Add g["ell_c"], g["ell_r"] (B, E, 3) stacking the primitives named in ELLIPSOIDS."""
    def radii(name):
        if name == "hair":
            return g["hair_r"]
        if name == "eye":
            return torch.full_like(g["eye_c"], EYE_R)
        r = g[name + "_r"]
        return r.expand(-1, 3) if r.shape[-1] == 1 else r
    centre = {"hair": g["cran_c"]}
    g["ell_c"] = torch.stack([centre.get(n, g.get(n + "_c")) for n in ELLIPSOIDS], 1)
    g["ell_r"] = torch.stack([radii(n) for n in ELLIPSOIDS], 1)


def head_sdf(p: Tensor, g: dict[str, Tensor], parts: bool = False):
    """Distance from canonical points p (N, 3) to the head; g holds per-point params (N, ...).

    Returns the scene distance (N,), and with ``parts`` also a dict of the material groups
    ("skin", "eye", "hair", "cloth") and the sub-parts used for painting ("lips", "ala", ...).
    """
    mirror = torch.tensor([n in MIRRORED for n in ELLIPSOIDS], device=p.device)[:, None]
    ps = torch.cat([p[:, :1].abs(), p[:, 1:]], -1)
    pe = torch.where(mirror, ps[:, None], p[:, None])            # (N, E, 3)
    r = g["ell_r"]
    q = (pe - g["ell_c"]) / r
    k0 = q.norm(dim=-1)
    e = k0 * (k0 - 1.0) / (q / r).norm(dim=-1).clamp_min(1e-6)   # Quilez's ellipsoid bound
    el = {n: e[:, i] for n, i in _E.items()}
    d = smin(smin(el["cran"], el["face"], 0.3), el["jaw"], 0.3)
    d = smin(d, el["chin"], 0.2)
    d = smin(d, el["cheek"], 0.15)
    d = smin(d, el["brow"], g["brow_k"].squeeze(-1))
    d = smax(d, -el["socket"], 0.07)
    nose = smin(sd_capsule(p, g["nose_a"], g["nose_b"], g["nose_ra"], g["nose_rb"]),
                el["tip"], 0.05)
    nose = smin(nose, el["ala"], 0.04)
    d = smin(d, nose, 0.07)
    lips = torch.minimum(el["lipu"], el["lipl"])
    d = smin(d, lips, 0.03)
    d = smin(d, el["ear"], 0.05)
    skin = smin(d, sd_capsule(p, g["neck_a"], g["neck_b"], g["neck_r"], g["neck_r"]), 0.25)
    hair = smax(el["hair"], hair_cut(p, g["hair_par"]), 0.04)
    # long hair: hangs behind the face plane (z < 0.15) and never in front of the face
    long_ = smax(el["long"], (p[:, 2] - 0.15 + 0.25 * (p[:, 1] + 0.4).clamp_min(0)), 0.1)
    long_ = torch.where(g["hair_par"][:, 4] > 0.35, long_, torch.full_like(long_, 9.0))
    hair = smin(hair, long_, 0.15)
    total = torch.minimum(torch.minimum(skin, el["eye"]), torch.minimum(hair, el["torso"]))
    if not parts:
        return total
    return total, {"skin": skin, "eye": el["eye"], "hair": hair, "cloth": el["torso"],
                   "lips": lips, "ala": el["ala"], "ear": el["ear"], "nose": nose}


def gather(g: dict[str, Tensor], index: Tensor, keys=None) -> dict[str, Tensor]:
    """Per-point parameters: row ``index[n]`` of every (B, ...) tensor (or only of ``keys``)."""
    return {k: g[k].index_select(0, index) for k in (keys or g)}


def sdf_normal(p: Tensor, g: dict[str, Tensor], h: float = 2e-3) -> Tensor:
    """Unit SDF gradient by the tetrahedron finite-difference rule (4 evaluations)."""
    k = torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=p.dtype,
                     device=p.device)
    n = sum(k[i] * head_sdf(p + h * k[i], g)[:, None] for i in range(4))
    return torch.nn.functional.normalize(n, dim=-1)


def canonical_landmarks(g: dict[str, Tensor]) -> Tensor:
    """(B, K, 3) landmark guesses, before snapping to the surface.

    Order: image-left eye (canonical -x), image-right eye, nose tip, image-left mouth corner,
    image-right mouth corner (MTCNN's five), then chin, left brow, right brow, upper lip, lower
    lip, left ear, right ear.
    """
    neg = torch.tensor([-1.0, 1.0, 1.0], device=g["eye_c"].device)
    eye = g["eye_c"] + torch.tensor([0.0, 0.0, EYE_R], device=neg.device)
    tip = g["tip_c"] + torch.cat([torch.zeros_like(g["tip_r"]), torch.zeros_like(g["tip_r"]),
                                  g["tip_r"]], -1)
    mouth = g["mouth"]
    chin = g["chin_c"] + torch.cat([torch.zeros_like(g["chin_r"]), -0.5 * g["chin_r"],
                                    0.87 * g["chin_r"]], -1)
    brow = g["brow_c"] + torch.tensor([0.0, 0.02, 0.10], device=neg.device)
    lipu = g["lipu_c"] + torch.tensor([0.0, 0.0, 0.085], device=neg.device)
    lipl = g["lipl_c"] + torch.tensor([0.0, 0.0, 0.085], device=neg.device)
    ear = g["ear_c"] + torch.cat([g["ear_r"][:, :1], torch.zeros_like(g["ear_r"][:, :2])], -1)
    pts = [eye * neg, eye, tip, mouth * neg, mouth, chin, brow * neg, brow, lipu, lipl,
           ear * neg, ear]
    return torch.stack(pts, 1)


NUM_LANDMARKS = 12
