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
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from icp.core.errors import DataError

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

# Limits on what one sample may hold (shards may come from someone else: a hostile or broken
# sample is rejected before it can allocate much memory or reach the training loop).
MAX_VIEWS = 256
MAX_PIXELS = 4096 * 4096            # per view image; PIL's own decompression-bomb guard is ~5x larger
MAX_CHANNELS = 16                   # of a per-pixel .npy field
MAX_META_VALUES = 1 << 20           # numbers in one meta.json array
MAX_INDEX = 1 << 53                 # identity indices stay exact as JSON numbers and float64
# Members the schema knows; anything else (other names, paths, "..") makes the sample bad.
_MEMBER = re.compile(r"(meta\.json|crc\.json|v(\d{2,3})\.(rgb|fg)\.png|([a-z][a-z0-9_]{0,63})\.npy)")
_FIELD = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Names decode_group itself emits: a field of the same name would overwrite them.
RESERVED = {"rgb", "fg", "identity_index", "source"}
# Known per-view meta fields: (rank, trailing sizes that are fixed; None = any), checked so that a
# sample that decodes also batches (paper data: pose yaw/pitch/roll, 2-D landmarks).
_META_SHAPES = {"pose": (2, (3,)), "landmarks": (3, (None, 2)), "landmarks_visible": (2, (None,)),
                "light": (2, (None,)), "background": (2, (None,)), "identity_params": (2, (None,))}


def decode_group(members: dict[str, bytes], where: str = "<sample>", max_pixels: int = MAX_PIXELS,
                 max_views: int = MAX_VIEWS) -> dict:
    """Tar members of one sample -> tensors: ``rgb`` (V,3,H,W) and ``fg`` (V,1,H,W) float [0,1],
    spatial arrays (``coords``, ``depth``...) float32, meta arrays with their dtype,
    ``identity_index`` int and ``source`` str.

    Raises DataError naming ``where`` on anything that does not follow the schema: checksum,
    unknown or missing member, bad JSON, non-finite or out-of-range numbers, images of the wrong
    size, format or over ``max_pixels``, arrays of the wrong shape or dtype. Nothing else escapes.
    """
    try:
        return _decode(members, where, max_pixels, max_views)
    except DataError:
        raise
    except Exception as err:  # a corrupt PNG/npy/json surfaces as many library exception types
        raise DataError(f"{where}: cannot decode ({type(err).__name__}: {str(err)[:120]})") from None


def _bad(where: str, what: str) -> DataError:
    return DataError(f"{where}: {what}")


def _decode(members: dict[str, bytes], where: str, max_pixels: int, max_views: int) -> dict:
    for name, data in members.items():
        if not isinstance(name, str) or not _MEMBER.fullmatch(name):
            raise _bad(where, f"unexpected member {str(name)[:80]!r} (not part of the shard schema)")
        if not isinstance(data, (bytes, bytearray)):
            raise _bad(where, f"member {name} is not file data")
    try:
        crc = json.loads(members["crc.json"])
    except (KeyError, ValueError, UnicodeDecodeError, RecursionError) as err:
        raise _bad(where, f"crc.json missing or unreadable ({type(err).__name__})") from None
    if not isinstance(crc, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in crc.values()):
        raise _bad(where, "crc.json is not a mapping of member names to crc32 numbers")
    listed = set(crc)
    present = set(members) - {"crc.json"}
    if listed != present:
        raise _bad(where, f"members {sorted(present ^ listed)[:5]} missing or unexpected")
    for name, value in crc.items():
        if zlib.crc32(members[name]) != value:
            raise _bad(where, f"checksum mismatch in member {name} (corrupt shard; re-create it)")
    try:
        meta = json.loads(members["meta.json"], parse_constant=_refuse_constant)
    except (KeyError, ValueError, UnicodeDecodeError, RecursionError) as err:
        raise _bad(where, f"meta.json missing or not valid JSON ({type(err).__name__}: {str(err)[:80]})") from None
    if not isinstance(meta, dict):
        raise _bad(where, "meta.json is not a JSON object")
    views = _int(meta, "views", where, 1, max_views)
    height = _int(meta, "height", where, 1, max_pixels)
    width = _int(meta, "width", where, 1, max_pixels)
    if height * width > max_pixels:
        raise _bad(where, f"{width}x{height} images exceed the {max_pixels}-pixel cap (decompression bomb?)")
    out: dict = {"identity_index": _int(meta, "identity_index", where, 0, MAX_INDEX)}
    source = meta.get("source", "")
    if not isinstance(source, str) or len(source) > 1000:
        raise _bad(where, "meta.json 'source' must be a short string")
    out["source"] = source
    out["rgb"] = torch.stack([_read_png(_member(members, f"v{v:02d}.rgb.png", where), "RGB", (width, height), where)
                              for v in range(views)])
    if "v00.fg.png" in members:
        out["fg"] = torch.stack([_read_png(_member(members, f"v{v:02d}.fg.png", where), "L", (width, height), where)
                                 for v in range(views)])
    images = {f"v{v:02d}.{kind}.png" for v in range(views) for kind in ("rgb", "fg")}
    extra = sorted(m for m in members if m.endswith(".png") and m not in images)
    if extra:
        raise _bad(where, f"image {extra[0]} beyond the {views} views meta.json declares")
    for member in sorted(members):
        if member.endswith(".npy"):
            name = member[: -len(".npy")]
            if name in RESERVED:
                raise _bad(where, f"member {member} would replace the reserved field '{name}'")
            out[name] = _read_npy(members[member], (views, height, width), f"{where}: {member}")
    arrays = meta.get("arrays", {})
    if not isinstance(arrays, dict):
        raise _bad(where, "meta.json 'arrays' is not a JSON object")
    for name, spec in arrays.items():
        if not _FIELD.fullmatch(name) or name in RESERVED or name in out:
            raise _bad(where, f"meta.json array name {name[:80]!r} is invalid or repeats another field")
        out[name] = _meta_array(spec, views, f"{where}: meta.json '{name}'", _META_SHAPES.get(name))
    return out


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number this schema accepts")


def _member(members: dict[str, bytes], name: str, where: str) -> bytes:
    if name not in members:
        raise _bad(where, f"member {name} is missing (meta.json declares more views)")
    return members[name]


def _int(meta: dict, key: str, where: str, low: int, high: int) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _bad(where, f"meta.json '{key}' must be an integer in [{low}, {high}], got {str(value)[:40]}")
    return value


def convert_8bit(img: Image.Image, mode: str) -> Image.Image:
    """``img.convert(mode)`` that scales 16-bit (and 32-bit integer) greyscale to 8 bits instead of
    clipping: PIL's own conversion saturates every value above 255, so a 16-bit PNG became white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.float64)
        # "I" holds a 16-bit PNG on older Pillow; a wider range is scaled from its own maximum.
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else float(arr.max())
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        img = Image.fromarray(np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8), mode="L")
    return img.convert(mode)


def _read_png(data: bytes, mode: str, size: tuple[int, int], where: str) -> Tensor:
    # formats=["PNG"]: no other (larger, riskier) image parser ever sees shard bytes. The size is
    # read from the header and checked before any pixel is decompressed.
    with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
        if img.size != size:
            raise _bad(where, f"an image is {img.size[0]}x{img.size[1]}, meta.json says {size[0]}x{size[1]}")
        img.load()
        arr = np.asarray(convert_8bit(img, mode))
    t = torch.from_numpy(arr.copy())
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t.float() / 255.0


def _read_npy(data: bytes, frame: tuple[int, int, int], where: str) -> Tensor:
    """A (V, C, H, W) float16/32 array, its header checked before anything is allocated."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:
        raise DataError(f"{where}: unsupported .npy version {version}")
    if dtype.newbyteorder("=") not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise DataError(f"{where}: dtype {dtype}, expected float16 or float32")
    views, height, width = frame
    if len(shape) != 4 or shape[0] != views or tuple(shape[2:]) != (height, width) or not 1 <= shape[1] <= MAX_CHANNELS:
        raise DataError(f"{where}: shape {tuple(shape)}, expected ({views}, C<={MAX_CHANNELS}, {height}, {width})")
    count = int(np.prod(shape))
    body = data[buf.tell():]
    if len(body) != count * dtype.itemsize:
        raise DataError(f"{where}: {len(body)} data bytes, the header needs {count * dtype.itemsize} (truncated?)")
    arr = np.frombuffer(body, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")
    t = torch.from_numpy(arr.astype(np.float32))
    if not bool(torch.isfinite(t).all()):
        raise DataError(f"{where}: holds NaN or infinite values")
    return t


def _meta_array(spec, views: int, where: str, known: tuple | None) -> Tensor:
    if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES or not isinstance(spec.get("data"), list):
        raise DataError(f"{where}: must be {{dtype: bool|int64|float32, data: [...]}}")
    if _count_values(spec["data"]) > MAX_META_VALUES:
        raise DataError(f"{where}: more than {MAX_META_VALUES} values")
    try:
        t = torch.tensor(spec["data"], dtype=_DTYPES[spec["dtype"]])
    except (TypeError, ValueError, OverflowError, RuntimeError) as err:
        raise DataError(f"{where}: not a rectangular array of {spec['dtype']} ({str(err)[:80]})") from None
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise DataError(f"{where}: holds NaN, infinite or out-of-range values")
    if t.ndim < 1 or t.shape[0] != views:
        raise DataError(f"{where}: shape {tuple(t.shape)}, expected one row per view ({views})")
    if known is not None:
        rank, trailing = known
        if t.ndim != rank or any(n is not None and n != m for n, m in zip(trailing, t.shape[1:])):
            want = ", ".join(["V"] + ["*" if n is None else str(n) for n in trailing])
            raise DataError(f"{where}: shape {tuple(t.shape)}, expected ({want})")
    return t


def _count_values(data: list, limit: int = MAX_META_VALUES) -> int:
    """Leaves of a nested list, counted iteratively (stops early past ``limit``)."""
    count, stack = 0, [data]
    while stack and count <= limit:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            count += not node
        else:
            count += 1
    return count


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
        where = path.parent if path.name == MANIFEST else path  # a folder that does not exist is named itself
        raise DataError(f"no {MANIFEST} in {where} (create shards with `icp shards synth` or "
                        "`icp shards import`, or point to the folder that holds them)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, RecursionError) as err:
        raise DataError(f"{path}: not valid JSON ({str(err)[:100]}); re-create the folder's shards") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: a manifest is a JSON object, not a {type(manifest).__name__}; re-create the shards")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {version}, this code reads {SCHEMA_VERSION}; re-create the shards")
    for key in ("shards", "fields", "counts"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks '{key}'; re-create the shards")
    _check_manifest(manifest, path)
    return manifest


# A shard is a plain file beside its manifest: a name with a path in it ("../x", "/dev/zero", a
# FIFO) could make a reader leave the folder or block forever.
_SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,200}\.tar")


def _check_manifest(manifest: dict, path: Path) -> None:
    shards, fields, counts = manifest["shards"], manifest["fields"], manifest["counts"]
    if not isinstance(shards, list) or not isinstance(fields, dict) or not isinstance(counts, dict):
        raise DataError(f"{path}: 'shards' must be a list, 'fields' and 'counts' mappings; re-create the shards")
    seen: set[str] = set()
    for entry in shards:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or ".." in name:
            raise DataError(f"{path}: shard name {str(name)[:80]!r} is not a plain .tar file name in this folder")
        samples = entry.get("samples")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise DataError(f"{path}: shard {name} has no valid sample count ({str(samples)[:40]})")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise DataError(f"{path}: shard {name} has no valid sha256; re-create the shards")
        if name in seen:  # listed twice: training would see its samples twice
            raise DataError(f"{path}: shard {name} is listed twice; re-create the shards")
        seen.add(name)
    for key in ("present", "required"):
        value = fields.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{path}: fields.{key} must be a list of names")
    for key, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"{path}: counts.{key} must be a non-negative integer")
