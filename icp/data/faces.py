"""Face detection and alignment for real photos (importer and inference share it).

facenet-pytorch's MTCNN finds the face and its 5 landmarks (eyes, nose, mouth corners); its
weights ship inside the package, so this works offline. The crop is a similarity transform
(rotation + uniform scale + shift, no shear) fitted by least squares (Umeyama) from those 5
landmarks to a fixed template, so every photo lands in the same canonical frame as our
synthetic renders: head centred, eyes level.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from icp.core.errors import DataError

# The widely used 5-point template of 112x112 face crops (eyes, nose tip, mouth corners),
# shrunk about the crop centre so the whole head and some hair fit: tight 112px templates crop
# at the eyebrows and chin, while portrait generation needs the head outline. See
# docs/decisions/data.md.
_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
TEMPLATE_SHRINK = 0.55
TEMPLATE = ((_TEMPLATE_112 / 112.0) - 0.5) * TEMPLATE_SHRINK + 0.5  # (5, 2) in unit crop coords
TEMPLATE[:, 1] += 0.04  # push the face a little down: more room for hair than for neck


class AlignedFace(NamedTuple):
    """One aligned face crop.

    image: (3, R, R) float in [-1, 1] (the batch contract's image range);
    landmarks: (5, 2) pixel x, y of eyes, nose, mouth corners inside the crop;
    box: (4,) x0, y0, x1, y1 of the detection in the source image's pixels;
    prob: detector confidence.
    """

    image: Tensor
    landmarks: Tensor
    box: Tensor
    prob: float


@functools.lru_cache(maxsize=2)
def _detector(device: str):
    from facenet_pytorch import MTCNN

    # select_largest: a portrait's subject is its biggest face, not a face in the background.
    return MTCNN(keep_all=False, select_largest=True, device=device)


def to_uint8_hwc(image: Image.Image | np.ndarray | Tensor, source: str = "<image>") -> np.ndarray:
    """PIL image, HxWx3 array or (3, H, W) tensor -> HxWx3 uint8 RGB array.

    Float tensors follow the batch contract ([-1, 1]); uint8 tensors/arrays are taken as is;
    float arrays are taken as [0, 1] (numpy/skimage convention).
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise DataError(f"{source}: expected a (3, H, W) image tensor, got shape {tuple(t.shape)}")
        t = t.expand(3, -1, -1)
        if t.dtype != torch.uint8:
            t = ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return t.permute(1, 2, 0).contiguous().numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise DataError(f"{source}: expected an HxWx3 RGB image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(arr)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991) mapping src (N,2) onto dst (N,2); returns 3x3."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1  # forbid reflections
    rot = u @ sign @ vt
    var_s = (s**2).sum() / len(src)
    scale = np.trace(np.diag(sig) @ sign) / var_s
    m = np.eye(3)
    m[:2, :2] = scale * rot
    m[:2, 2] = mu_d - scale * rot @ mu_s
    return m


def warp_to_crop(image: Tensor, src_to_crop: np.ndarray, resolution: int) -> Tensor:
    """Resample image (3, H, W) float into a (3, R, R) crop; src_to_crop maps source -> crop pixels.

    Pixel coordinates are continuous (pixel i spans [i, i+1]), matching align_corners=False.
    """
    _, h, w = image.shape
    crop_to_src = np.linalg.inv(src_to_crop)
    # normalised crop -> crop pixels -> source pixels -> normalised source
    from_norm = np.array([[resolution / 2, 0, resolution / 2], [0, resolution / 2, resolution / 2], [0, 0, 1]])
    to_norm = np.array([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]])
    theta = torch.tensor((to_norm @ crop_to_src @ from_norm)[:2], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, [1, 3, resolution, resolution], align_corners=False)
    # reflection padding: a face near the photo border gets mirrored context instead of black bars
    out = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out[0]


def detect(image: Image.Image | np.ndarray | Tensor, source: str = "<image>", device: str = "cpu"):
    """Largest face: (box (4,), landmarks (5, 2), prob) in source pixels, or None if no face."""
    rgb = to_uint8_hwc(image, source)
    boxes, probs, points = _detector(device).detect(Image.fromarray(rgb), landmarks=True)
    if boxes is None or len(boxes) == 0:
        return None
    # numpy 2 + facenet-pytorch 2.5.3 hands back object arrays; cast explicitly.
    boxes = np.asarray(np.asarray(boxes).tolist(), dtype=np.float32)
    points = np.asarray(np.asarray(points).tolist(), dtype=np.float32)
    probs = np.asarray(np.asarray(probs).tolist(), dtype=np.float32)
    return boxes[0], points[0], float(probs[0])


def detect_and_align(
    image: Image.Image | np.ndarray | Tensor,
    resolution: int,
    source: str = "<image>",
    device: str = "cpu",
) -> AlignedFace:
    """Detect the largest face and return it aligned to the canonical template at ``resolution``.

    Raises DataError naming ``source`` when no face is found.
    """
    if resolution < 8:
        raise DataError(f"{source}: crop resolution {resolution} is too small (use at least 8)")
    found = detect(image, source, device)
    if found is None:
        raise DataError(f"no face found in {source} (use a photo with one clearly visible, roughly frontal face)")
    box, points, prob = found
    src_to_crop = similarity_transform(points, TEMPLATE * resolution)
    rgb = to_uint8_hwc(image, source)
    img = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # PIL arrays are read-only
    crop = warp_to_crop(img, src_to_crop, resolution).clamp(-1, 1)
    pts = np.c_[points, np.ones(len(points))] @ src_to_crop.T
    return AlignedFace(
        image=crop,
        landmarks=torch.tensor(pts[:, :2], dtype=torch.float32),
        box=torch.tensor(box, dtype=torch.float32),
        prob=prob,
    )
