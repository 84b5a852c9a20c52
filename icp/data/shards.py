"""The shard schema: one WebDataset sample = one identity with all its views and ground truth.

Members of a sample (``<key>.<member>`` inside the tar; the key has no dots):

- ``meta.json``       identity index, view count, resolution, source, and the non-image fields
                      under ``arrays`` ({name: {dtype, data}}): ``pose`` (V, 3) yaw/pitch/roll deg,
                      ``light`` (V, L), ``landmarks`` (V, K, 2), ``identity_params`` (V, D), ...;
                      each optional (real photos lack most of them)
- ``vNN.rgb.png``     view NN, RGB uint8 (required)
- ``vNN.fg.png``      view NN foreground, L uint8 (optional)
- ``<name>.npy``      (V, C, H, W) float16 per-pixel ground truth: ``coords`` (canonical surface
                      coordinates), ``depth``, ``normals`` (optional)
- ``crc.json``        crc32 of every other member, so a flipped bit anywhere in a sample is caught
                      by the reader (tar itself only checksums headers)

Which optional fields a folder has is in its manifest (``fields``); readers emit exactly those.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
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
# What the synthetic renderer provides; real imports have a subset (see each manifest's "fields").
OPTIONAL_FIELDS = ("fg", "coords", "depth", "normals", "pose", "light", "landmarks", "landmarks_visible",
                   "background", "identity_params")


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
    """A render_group-style dict -> tar members (bytes). See the module docstring for the layout.

    ``rgb`` (V,3,H,W) and ``fg`` (V,1,H,W) in [0, 1] become PNGs; any other (V, C, H, W) float
    tensor becomes ``<name>.npy`` (float16); any other tensor or list goes into meta.json.
    """
    rgb = group["rgb"]
    views, _, height, width = rgb.shape
    members: dict[str, bytes] = {}
    meta: dict = {"identity_index": int(identity_index), "views": int(views), "height": int(height),
                  "width": int(width), "source": source, "arrays": {}}
    for name, value in group.items():
        if value is None or name in ("rgb", "identity_index"):
            continue
        if name == "fg":
            for v in range(views):
                members[f"v{v:02d}.fg.png"] = _png(to_uint8(value[v]))
        elif isinstance(value, Tensor) and value.ndim == 4 and value.shape[-2:] == (height, width):
            members[f"{name}.npy"] = _npy(value.detach().cpu().to(torch.float16).numpy())
        else:
            value = torch.as_tensor(value).detach().cpu()
            dtype = {torch.bool: "bool", torch.int64: "int64", torch.int32: "int64"}.get(value.dtype, "float32")
            data = value.tolist() if dtype != "float32" else value.float().tolist()
            meta["arrays"][name] = {"dtype": dtype, "data": data}
    for v in range(views):
        members[f"v{v:02d}.rgb.png"] = _png(to_uint8(rgb[v]))
    members["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    members["crc.json"] = json.dumps({k: zlib.crc32(b) for k, b in sorted(members.items())}).encode()
    return members


_DTYPES = {"bool": torch.bool, "int64": torch.int64, "float32": torch.float32}


def decode_group(members: dict[str, bytes], where: str = "<sample>") -> dict:
    """Tar members of one sample -> tensors: ``rgb`` (V,3,H,W) and ``fg`` (V,1,H,W) float [0,1],
    spatial arrays (``coords``, ``depth``...) float32, meta arrays with their dtype,
    ``identity_index`` int and ``source`` str.

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
        out["rgb"] = torch.stack([_read_png(members[f"v{v:02d}.rgb.png"], "RGB") for v in range(views)])
        if "v00.fg.png" in members:
            out["fg"] = torch.stack([_read_png(members[f"v{v:02d}.fg.png"], "L") for v in range(views)])
        for member in sorted(members):
            if member.endswith(".npy"):
                arr = np.load(io.BytesIO(members[member]), allow_pickle=False)
                name = member[: -len(".npy")]
                out[name] = torch.from_numpy(arr.astype(np.float32))
                if out[name].shape[0] != views or out[name].shape[-2:] != out["rgb"].shape[-2:]:
                    raise DataError(f"{where}: {member} has shape {tuple(arr.shape)}, expected {views} views "
                                    f"of {tuple(out['rgb'].shape[-2:])}")
        for name, spec in meta.get("arrays", {}).items():
            out[name] = torch.tensor(spec["data"], dtype=_DTYPES[spec["dtype"]])
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
    """The optional fields present in a decoded or to-be-encoded group (sorted names)."""
    skip = set(REQUIRED_FIELDS) | {"identity_index", "source"}
    return sorted(k for k, v in group.items() if v is not None and k not in skip and not k.startswith("_"))


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
