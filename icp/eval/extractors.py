"""The feature-extractor family: one signature, images -> features.

Every extractor is called as ``extractor(images) -> Tensor`` (or, for face recognisers, a
:class:`FaceFeatures` that also says where a face was found). ``images`` is either

* ``uint8`` (B, 3, H, W) in [0, 255], or
* floating point (B, 3, H, W) in [-1, 1] -- the batch contract of ``icp.data.keys``.

:func:`to_uint8` / :func:`to_unit` convert between the two so each extractor can feed its
library what it expects. Every extractor loads REAL weights from a local file through its
library's own loader and records the file's sha256 in ``weights_sha256``; when the file is
absent, building it raises :class:`ExtractorUnavailable` (a ``WeightsError``) whose one-line
message names the option that enables it. Metrics built on an unavailable extractor are
reported as unavailable -- never computed with random weights (DESIGN.md §5).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from icp.core.errors import DataError, WeightsError


class ExtractorUnavailable(WeightsError):
    """The weights an extractor needs are not on this machine; the message says how to enable it."""

    def __init__(self, name: str, reason: str, option: str):
        self.name, self.reason, self.option = name, reason, option
        super().__init__(f"{name} unavailable: {reason}; set {option} to enable it")


@dataclass
class FaceFeatures:
    """Output of a face recogniser: one embedding per image and whether a face was found.

    ``embeddings`` is (B, D) float, L2-normalised; rows whose ``detected`` is False are zero.
    """

    embeddings: Tensor
    detected: Tensor  # (B,) bool


@runtime_checkable
class Extractor(Protocol):
    name: str              # stable identifier recorded in metrics.json (protocol key)
    weights_sha256: str    # of the weight file (or folder) actually loaded
    weights_file: str      # where it was loaded from (the leaderboard re-checks its sha256)

    def __call__(self, images: Tensor): ...


def check_images(images: Tensor, who: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{who}: expected images of shape (B, 3, H, W), got {shape}")


def to_uint8(images: Tensor) -> Tensor:
    """uint8 (B,3,H,W) in [0,255] from either accepted form (float is read as [-1, 1])."""
    if images.dtype == torch.uint8:
        return images
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit(images: Tensor) -> Tensor:
    """float32 (B,3,H,W) in [0,1] from either accepted form."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return (images.float().clamp(-1, 1) + 1) / 2


def file_sha256(path: str | Path) -> str:
    """sha256 of a file or, for a folder (a transformers model), of its files' names and bytes."""
    path = Path(path)
    if not (path.is_file() or path.is_dir()):  # a FIFO or device (/dev/zero) would be read forever
        raise DataError(f"{path}: not a regular file or folder; cannot hash it")
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def require_file(path: str | Path | None, name: str, option: str, folder: bool = False) -> Path:
    """The weight path, or ExtractorUnavailable naming ``option`` when it is unset or absent."""
    if path is None or str(path) == "":
        raise ExtractorUnavailable(name, "no weight path given", option)
    path = Path(path).expanduser()
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        kind = "folder" if folder else "file"
        raise ExtractorUnavailable(name, f"weight {kind} {path} not found", option)
    return path
