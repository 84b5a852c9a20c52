"""facenet-pytorch InceptionResnetV1 (VGGFace2) identity embedding with MTCNN alignment.

``InceptionResnetV1(pretrained='vggface2')`` downloads its weights, which cannot happen here, so
the model is built with ``pretrained=None`` and loaded from a LOCAL state-dict file (the
VGGFace2 checkpoint, ``20180402-114759-vggface2.pt``, or one saved from such a model). MTCNN's
own weights (pnet/rnet/onet) ship inside the facenet-pytorch wheel.

Differentiable in the embedding part, but used here as a metric on detected, aligned crops.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from icp.core.errors import WeightsError
from icp.eval.extractors import FaceFeatures, check_images, file_sha256, require_file, to_uint8

OPTION = "metrics.facenet_weights in eval/protocol.yaml or callbacks.eval.facenet_weights (a local InceptionResnetV1 VGGFace2 state dict, e.g. 20180402-114759-vggface2.pt)"


def load_inception_resnet(path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """InceptionResnetV1 with weights from ``path`` (a state dict saved with torch.save)."""
    from facenet_pytorch import InceptionResnetV1

    model = InceptionResnetV1(pretrained=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of many kinds: the file is not a state dict
        raise WeightsError(f"{path}: not a torch state dict ({type(err).__name__}); "
                           "save one with torch.save(model.state_dict(), path)") from None
    # The released checkpoint carries the 8631-way VGGFace2 classifier; embeddings do not use it.
    state = {k: v for k, v in state.items() if not k.startswith("logits.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: not an InceptionResnetV1 state dict "
                           f"(missing {len(missing)} keys, e.g. {missing[:1]}; unexpected {unexpected[:1]})")
    return model.eval().requires_grad_(False).to(device)


class FacenetDescriptor:
    """images -> FaceFeatures with 512-D L2-normalised FaceNet (VGGFace2) embeddings.

    Args:
        weights: local path of the InceptionResnetV1 state dict (required; see ``OPTION``).
        image_size: MTCNN crop size (160 is what the network was trained on).
        margin: extra pixels around the MTCNN box.
        device: where both networks run.
    """

    name = "facenet-vggface2"

    def __init__(self, weights: str | None = None, image_size: int = 160, margin: int = 0,
                 device: str = "cpu"):
        path = require_file(weights, self.name, OPTION)
        from facenet_pytorch import MTCNN

        self.model = load_inception_resnet(str(path), device)
        # post_process=True standardises crops as (x - 127.5) / 128, the network's training input.
        self.mtcnn = MTCNN(image_size=image_size, margin=margin, post_process=True, select_largest=True,
                           keep_all=False, device=device)
        self.weights_sha256 = file_sha256(path)
        self.weights_file = str(path)
        self.device = torch.device(device)
        self.dim = 512

    def _crops(self, images: Tensor) -> list[Tensor | None]:
        arrays = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        crops: list[Tensor | None] = []
        for image in arrays:
            try:
                crop = self.mtcnn(np.ascontiguousarray(image))
            except (ValueError, TypeError, IndexError):
                # numpy 2 makes MTCNN's box arrays object-typed on some inputs; treat as no face.
                crop = None
            crops.append(crop)
        return crops

    @torch.no_grad()
    def __call__(self, images: Tensor) -> FaceFeatures:
        check_images(images, self.name)
        crops = self._crops(images)
        found = torch.tensor([c is not None for c in crops], dtype=torch.bool)
        emb = torch.zeros(len(crops), self.dim)
        if found.any():
            batch = torch.stack([c for c in crops if c is not None]).to(self.device)
            emb[found] = torch.nn.functional.normalize(self.model(batch).float().cpu(), dim=1)
        return FaceFeatures(emb.to(images.device), found.to(images.device))
