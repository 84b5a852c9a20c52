"""The extractors of the networks icp trains itself (labelled "trained by icp" in every report).

Each wraps a network from icp/models (the identity embedder, the geometry probe), loaded from the
file its training task exported, with the weights' sha256 recorded: images in, features out, like
every other extractor (icp/eval/extractors.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from icp.eval.extractors import FaceFeatures, check_images, file_sha256, require_file
from icp.models import embedder as E
from icp.models import probe as PR
from icp.models.probe import ProbeOutput


class _TrainedNet:
    """A network icp trained, loaded from its exported file (``module.load_net``), weights hashed."""

    name = ""
    module = None  # icp.models.embedder or icp.models.probe: LABEL, OPTION, load_net

    def __init__(self, weights: str | None = None, device: str = "cpu"):
        path = require_file(weights, self.name, self.module.OPTION)
        self.net = self.module.load_net(path).to(device)
        self.device = torch.device(device)
        self.weights_sha256 = file_sha256(path)
        self.weights_file = str(path)

    def _inputs(self, images: Tensor) -> Tensor:
        """Checked images in [-1, 1] (uint8 accepted) on the network's device."""
        check_images(images, self.name)
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1
        return images.to(self.device)


class IcpEmbedder(_TrainedNet):
    """The synthetic benchmark's identity extractor: images -> FaceFeatures (every image 'detected':
    renders are aligned heads, there is no detection step to fail)."""

    name = "icp-synthetic-embedder"
    label = E.LABEL
    module = E

    def __init__(self, weights: str | None = None, device: str = "cpu"):
        super().__init__(weights, device)
        self.dim = self.net.hparams["dim"]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> FaceFeatures:
        emb = self.net(self._inputs(images)).to(images.device)
        return FaceFeatures(emb, torch.ones(len(images), dtype=torch.bool, device=images.device))


class IcpGeometryProbe(_TrainedNet):
    """The view-consistency extractor: images -> :class:`ProbeOutput` (no detection step: every
    image gets a reading; whether it is right is what the probe's reliability report says)."""

    name = "icp-geometry-probe"
    label = PR.LABEL
    module = PR

    def __init__(self, weights: str | None = None, device: str = "cpu"):
        super().__init__(weights, device)
        self.landmarks = self.net.k

    @torch.no_grad()
    def __call__(self, images: Tensor) -> ProbeOutput:
        out = self.net.read(self._inputs(images))
        dev = images.device
        return ProbeOutput(out.mask_logits.to(dev), out.landmarks.to(dev), out.pose.to(dev))
