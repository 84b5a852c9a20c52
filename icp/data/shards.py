"""The shard schema: one WebDataset sample = one identity with all its views and ground truth.

Members of a sample (``<key>.<member>`` inside the tar; the key has no dots):

- ``meta.json``       identity index, view count, resolution, source, and per-view parameters:
                      ``pose`` (V, 3) yaw/pitch/roll deg, ``light`` (V, L), ``landmarks`` (V, K, 2),
                      ``identity_params`` (D,); each optional (real photos lack most of them)
- ``vNN.rgb.png``     view NN, RGB uint8 (required)
- ``vNN.fg.png``      view NN foreground, L uint8 (optional)
- ``coords.npy``      (V, 3, H, W) float16 canonical surface coordinates (optional)
- ``depth.npy``       (V, 1, H, W) float16 depth (optional)
- ``crc.json``        crc32 of every other member, so a flipped bit anywhere in a sample is caught
                      by the reader (tar itself only checksums headers)

Which optional fields a folder has is in its manifest (``fields``); readers emit exactly those.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from icp.errors import DataError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_MANIFEST = "manifest.partial.json"
REQUIRED_FIELDS = ("rgb",)
OPTIONAL_FIELDS = ("fg", "coords", "depth", "pose", "light", "landmarks", "identity_params")
META_FIELDS = ("pose", "light", "landmarks", "identity_params")
_VIEW_MEMBER = re.compile(r"^v(\d{2,})\.(rgb|fg)\.png$")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(identity_index: int) -> str:
    return f"id{identity_index:08d}"  # no dots: WebDataset splits key and member at the first dot


# ----------------------------------------------------------------------------- encode / decode


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def to_uint8(x: Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> HxWxC (or HxW for C=1) uint8."""
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def encode_group(identity_index: int, group: dict, source: str = "synthetic") -> dict[str, bytes]:
    """A render_group-style dict (see module docstring for the fields) -> tar members (bytes)."""
    rgb = group["rgb"]
    views, _, height, width = rgb.shape
    members: dict[str, bytes] = {}
    for v in range(views):
        members[f"v{v:02d}.rgb.png"] = _png(to_uint8(rgb[v]))
        if group.get("fg") is not None:
            members[f"v{v:02d}.fg.png"] = _png(to_uint8(group["fg"][v]))
    for name in ("coords", "depth"):
        if group.get(name) is not None:
            members[f"{name}.npy"] = _npy(group[name].detach().cpu().to(torch.float16).numpy())
    meta = {"identity_index": int(identity_index), "views": int(views), "height": int(height),
            "width": int(width), "source": source}
    for name in META_FIELDS:
        value = group.get(name)
        if value is not None:
            meta[name] = value.detach().cpu().float().tolist() if isinstance(value, Tensor) else value
    members["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    members["crc.json"] = json.dumps({k: zlib.crc32(b) for k, b in sorted(members.items())}).encode()
    return members


def decode_group(members: dict[str, bytes], where: str = "<sample>") -> dict:
    """Tar members of one sample -> tensors: ``rgb`` (V,3,H,W) and ``fg`` (V,1,H,W) float [0,1],
    ``coords``/``depth`` float32, meta fields as float tensors, ``identity_index`` int.

    Raises DataError naming ``where`` on any inconsistency (checksum, missing view, bad PNG...).
    """
    try:
        crc = json.loads(members["crc.json"])
    except (KeyError, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{where}: crc.json missing or unreadable ({type(err).__name__})") from None
    listed = set(crc)
    present = set(members) - {"crc.json"}
    if listed != present:
        raise DataError(f"{where}: members {sorted(present ^ listed)} missing or unexpected")
    for name, value in crc.items():
        if zlib.crc32(members[name]) != value:
            raise DataError(f"{where}: checksum mismatch in member {name} (corrupt shard; re-create it)")
    try:
        meta = json.loads(members["meta.json"])
        views = int(meta["views"])
        out: dict = {"identity_index": int(meta["identity_index"]), "source": meta.get("source", "")}
        rgb, fg = [], []
        for v in range(views):
            rgb.append(_read_png(members[f"v{v:02d}.rgb.png"], "RGB"))
            if f"v{v:02d}.fg.png" in members:
                fg.append(_read_png(members[f"v{v:02d}.fg.png"], "L"))
        out["rgb"] = torch.stack(rgb)
        if fg:
            if len(fg) != views:
                raise DataError(f"{where}: fg present for {len(fg)} of {views} views")
            out["fg"] = torch.stack(fg)
        for name in ("coords", "depth"):
            if f"{name}.npy" in members:
                arr = np.load(io.BytesIO(members[f"{name}.npy"]), allow_pickle=False)
                out[name] = torch.from_numpy(arr.astype(np.float32))
                if out[name].shape[0] != views or out[name].shape[-2:] != out["rgb"].shape[-2:]:
                    raise DataError(f"{where}: {name}.npy has shape {tuple(arr.shape)}, expected {views} views "
                                    f"of {tuple(out['rgb'].shape[-2:])}")
        for name in META_FIELDS:
            if name in meta:
                out[name] = torch.tensor(meta[name], dtype=torch.float32)
    except DataError:
        raise
    except Exception as err:  # a corrupt PNG/npy/json surfaces as many library exception types
        raise DataError(f"{where}: cannot decode ({type(err).__name__}: {str(err)[:120]})") from None
    return out


def _read_png(data: bytes, mode: str) -> Tensor:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        arr = np.asarray(img.convert(mode))
    t = torch.from_numpy(arr.copy())
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t.float() / 255.0


def fields_of(group: dict) -> list[str]:
    """The optional fields present in a decoded or to-be-encoded group."""
    return [f for f in OPTIONAL_FIELDS if group.get(f) is not None]


# ----------------------------------------------------------------------------------- manifest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a shard folder (or of the folder holding ``folder`` if it names a manifest)."""
    path = Path(folder)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {path.parent} (create shards with `icp shards synth` or "
                        "`icp shards import`, or point to the folder that holds them)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err}); re-create the folder's shards") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {version}, this code reads {SCHEMA_VERSION}; re-create the shards")
    for key in ("shards", "fields", "counts"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks '{key}'; re-create the shards")
    return manifest
