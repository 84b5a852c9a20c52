"""The icp geometry probe: a small CNN trained by icp that reads head geometry off an image.

No real detector reads our 32-64 px procedural heads reliably (dlib's HOG and MTCNN mostly find
no face there), yet the paper's central claim -- the output takes the TARGET's pose (§3.2-3.3) --
needs the output's geometry measured against the target's ground truth. This network maps an
image to (a) head-silhouette logits (B, 1, H, W), (b) the renderer's K landmarks in pixels
(``icp.render.head_model.canonical_landmarks`` order) and (c) yaw and pitch in degrees. It is
trained on true renders with light, background, blur and small geometric augmentation
(``icp.tasks.probe``) and always reported as "icp-geometry-probe, trained by icp", with its own
error on held-out true renders (``icp.eval.geometry.probe_reliability``) as the floor below which
its figures cannot resolve anything.

Landmarks come from heatmaps by soft-argmax (sub-pixel, translation-equivariant), the mask from
the same decoder, the pose from the pooled bottleneck. The exported file is a plain
``torch.save`` dict (format tag, hyper-parameters, state dict) loadable with ``weights_only=True``;
a Lightning checkpoint of the task loads too -- the embedder's shape (icp.models.embedder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icp.models import netfile

FORMAT = "icp-geometry-probe"
LABEL = "icp-geometry-probe, trained by icp"
OPTION = ("metrics.probe in eval/protocol.yaml or callbacks.eval.probe (a probe.pt exported by "
          "`icp fit experiments/probe.yaml`, or its .ckpt)")
POSE_SCALE = 45.0  # degrees per network unit: keeps the pose regression near unit scale
HPARAMS = ("landmarks", "width", "depth", "input_size")


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


@dataclass
class ProbeOutput:
    """What the probe reads from (B, 3, H, W) images, in THOSE images' pixel frame.

    mask_logits (B, 1, H, W); landmarks (B, K, 2) pixel x, y (centres at integers, like the
    renderer); pose (B, 2) yaw, pitch in degrees.
    """

    mask_logits: Tensor
    landmarks: Tensor
    pose: Tensor

    @property
    def mask(self) -> Tensor:
        return (self.mask_logits > 0).float()


class GeometryProbeNet(nn.Module):
    """A small U-Net: (B, 3, H, W) in [-1, 1] -> raw (mask logits, landmark heatmaps, pose).

    Inputs are resized to ``input_size`` (one network serves 32 and 64 px outputs); ``forward``
    returns everything at ``input_size``, :meth:`read` maps it back to the caller's pixel frame.
    """

    def __init__(self, landmarks: int = 12, width: int = 16, depth: int = 3, input_size: int = 32):
        super().__init__()
        if input_size % 2 ** depth:
            raise ValueError(f"probe input_size={input_size} must be divisible by 2**depth={2 ** depth}")
        self.hparams = dict(landmarks=landmarks, width=width, depth=depth, input_size=input_size)
        self.input_size, self.k = input_size, landmarks
        chans = [width * 2 ** min(i, 3) for i in range(depth + 1)]
        self.stem = _conv(3, chans[0])
        self.down = nn.ModuleList(_conv(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.up = nn.ModuleList(_conv(b + a, a) for a, b in zip(chans[:-1], chans[1:]))
        self.out = nn.Conv2d(chans[0], 1 + landmarks, 1)
        self.pose = nn.Sequential(nn.Flatten(), nn.Linear(2 * chans[-1], 64), nn.SiLU(), nn.Linear(64, 2))
        # heatmap sharpness, learned: soft-argmax of a flat map would pull every point to the centre
        self.log_temperature = nn.Parameter(torch.tensor(2.0))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.avg_pool2d(skips[-1], 2)))
        bottom = skips[-1]
        pose = self.pose(torch.cat([bottom.mean((2, 3)), bottom.amax((2, 3))], 1)) * POSE_SCALE
        y = bottom
        for block, skip in zip(reversed(self.up), reversed(skips[:-1])):
            y = block(torch.cat([F.interpolate(y, size=skip.shape[-2:], mode="nearest"), skip], 1))
        out = self.out(y)
        return out[:, :1], out[:, 1:], pose

    def soft_argmax(self, heatmaps: Tensor) -> Tensor:
        """(B, K, S, S) heatmaps -> (B, K, 2) expected pixel x, y at ``input_size``."""
        b, k, h, w = heatmaps.shape
        prob = (heatmaps.flatten(2) * self.log_temperature.exp()).softmax(-1).view(b, k, h, w)
        xs = torch.arange(w, device=heatmaps.device, dtype=prob.dtype)
        ys = torch.arange(h, device=heatmaps.device, dtype=prob.dtype)
        return torch.stack([(prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)], -1)

    def read(self, images: Tensor) -> ProbeOutput:
        """Mask, landmarks and pose in the pixel frame of ``images`` (any square size)."""
        logits, heatmaps, pose = self(images)
        size = images.shape[-1]
        lm = self.soft_argmax(heatmaps)
        if size != self.input_size:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
            lm = (lm + 0.5) * (size / self.input_size) - 0.5  # pixel centres, align_corners=False
        return ProbeOutput(logits, lm, pose)


def export(net: GeometryProbeNet, path: str | Path, meta: dict | None = None) -> Path:
    """Write the standalone file eval code loads (atomic; icp.models.netfile)."""
    return netfile.export(net, path, FORMAT, meta)


def load_net(path: str | Path) -> GeometryProbeNet:
    """GeometryProbeNet from an exported file or its training task's Lightning checkpoint."""
    return netfile.load(path, FORMAT, GeometryProbeNet, HPARAMS, "icp geometry probe", "experiments/probe.yaml")
