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

from icp.core.errors import WeightsError

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
    """Write the standalone embedder file eval code loads (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "version": 1, "hparams": dict(net.hparams), "meta": dict(meta or {}),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def load_net(path: str | Path) -> IdentityEmbedderNet:
    """IdentityEmbedderNet from an exported file or an EmbedderTask Lightning checkpoint."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle errors of many kinds: not a torch file we can read safely
        raise WeightsError(f"{path}: not an icp embedder file ({type(err).__name__}); "
                           "export one with `icp fit experiments/embedder.yaml`") from None
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        hparams, state = blob["hparams"], blob["state_dict"]
    elif isinstance(blob, dict) and "state_dict" in blob and "hyper_parameters" in blob:
        hp = blob["hyper_parameters"]
        hparams = {k: hp[k] for k in ("dim", "width", "depth", "input_size") if k in hp}
        state = {k[len("net."):]: v for k, v in blob["state_dict"].items() if k.startswith("net.")}
    else:
        raise WeightsError(f"{path}: neither an exported icp embedder nor an EmbedderTask checkpoint")
    net = IdentityEmbedderNet(**hparams)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise WeightsError(f"{path}: embedder weights do not fit its hyper-parameters "
                           f"({str(err).splitlines()[0]})") from None
    return net.eval().requires_grad_(False)
