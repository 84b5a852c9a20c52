"""The icp identity embedder: a small CNN trained by icp on synthetic identities.

No pretrained face recogniser knows our procedural heads, and dlib/FaceNet often fail to detect
faces in 64-128 px renders; so the synthetic benchmark's identity metric is this network,
trained with an ArcFace-style margin loss (``icp.tasks.embedder``) and always reported as
"icp-synthetic-embedder, trained by icp" -- never passed off as an independent recogniser.

The exported file is a plain ``torch.save`` dict (format tag, hyper-parameters, state dict)
loadable with ``weights_only=True``; a Lightning checkpoint of the task loads too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icp.models import netfile

FORMAT = "icp-identity-embedder"
LABEL = "icp-synthetic-embedder, trained by icp"
OPTION = "metrics.embedder in eval/protocol.yaml or callbacks.eval.embedder (an embedder.pt exported by `icp fit experiments/embedder.yaml`, or its .ckpt)"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(),
        nn.AvgPool2d(2),
    )


class IdentityEmbedderNet(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, dim) L2-normalised identity embedding.

    Inputs are resized to ``input_size`` so one network serves every render resolution.
    """

    def __init__(self, dim: int = 128, width: int = 32, depth: int = 4, input_size: int = 64):
        super().__init__()
        self.hparams = dict(dim=dim, width=width, depth=depth, input_size=input_size)
        self.input_size = input_size
        chans = [3] + [width * 2 ** min(i, 3) for i in range(depth)]
        self.features = nn.Sequential(*[_block(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(chans[-1] * 2, dim), nn.BatchNorm1d(dim))

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        x = self.features(x)
        # mean + max pooling: identity cues are both global (shape) and local (albedo patches)
        x = torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)
        return F.normalize(self.head(x), dim=1)


def export(net: IdentityEmbedderNet, path: str | Path, meta: dict | None = None) -> Path:
    """Write the standalone file eval code loads (atomic; icp.models.netfile)."""
    return netfile.export(net, path, FORMAT, meta)


def load_net(path: str | Path) -> IdentityEmbedderNet:
    """IdentityEmbedderNet from an exported file or its training task's Lightning checkpoint."""
    return netfile.load(path, FORMAT, IdentityEmbedderNet, ("dim", "width", "depth", "input_size"), "icp embedder", "experiments/embedder.yaml")
