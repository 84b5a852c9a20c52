"""The standalone file of a small network icp trains and then measures with (the identity embedder,
the geometry probe): weights + hyper-parameters, written atomically, read with ``weights_only``.

``load`` also takes the training task's Lightning checkpoint (the net's weights under ``net.``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from icp.core.errors import WeightsError


def export(net: nn.Module, path: str | Path, fmt: str, meta: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": fmt, "version": 1, "hparams": dict(net.hparams), "meta": dict(meta or {}),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def load(path: str | Path, fmt: str, build: Callable[..., nn.Module], hparam_names: tuple[str, ...],
         what: str, recipe: str) -> nn.Module:
    """``build(**hparams)`` with the weights of an exported ``fmt`` file or a task checkpoint, in eval mode.

    ``what`` names the net in errors ("icp embedder"), ``recipe`` the config that makes one.
    """
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle errors of many kinds: not a torch file we can read safely
        raise WeightsError(f"{path}: not an {what} file ({type(err).__name__}); "
                           f"export one with `icp fit {recipe}`") from None
    if isinstance(blob, dict) and blob.get("format") == fmt:
        hparams, state = blob["hparams"], blob["state_dict"]
    elif isinstance(blob, dict) and "state_dict" in blob and "hyper_parameters" in blob:
        hp = blob["hyper_parameters"]
        hparams = {k: hp[k] for k in hparam_names if k in hp}
        state = {k[len("net."):]: v for k, v in blob["state_dict"].items() if k.startswith("net.")}
    else:
        raise WeightsError(f"{path}: neither an exported {what} nor its training task's checkpoint")
    net = build(**hparams)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise WeightsError(f"{path}: {what} weights do not fit its hyper-parameters "
                           f"({str(err).splitlines()[0]})") from None
    return net.eval().requires_grad_(False)
