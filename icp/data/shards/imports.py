"""`icp shards import`: real photos -> shards of the same schema as the synthetic ones.

Layout: ``SRC/<identity>/<image>.{jpg,jpeg,png}``, optionally ``<image>.json`` holding the
camera pose as ``{"pose": [yaw, pitch, roll]}`` (degrees). Every face is detected and aligned
(icp.data.faces) to the crop our synthetic renders use. Real photos have no foreground masks,
surface coordinates, depth or light parameters: those fields are absent and the manifest lists
only the fields present. Photos without a face, or unreadable ones, are listed in
``OUT/import_report.json`` and printed, never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from icp.data.faces import detect_and_align
from icp.data.shards.format import MANIFEST, convert_8bit, PARTIAL_MANIFEST, encode_group, sample_key, shard_name, write_json_atomic
from icp.data.shards.write import _run_jobs, is_done, load_progress, manifest_dict, write_tar_atomic
from icp.core.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _regular(path: Path) -> bool:
    """A regular file, not a symlink: a FIFO, device or link to one (``/dev/zero``) would block or
    never end when read."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def scan(src: Path, skipped: list | None = None) -> list[tuple[str, list[Path]]]:
    """(identity name, sorted image paths) for every identity folder, sorted by name.

    Only regular files with an image suffix are taken; everything else under ``src`` (FIFOs,
    devices, symlinks, other formats, sub-folders, identity folders left empty) is appended to
    ``skipped`` as (path, reason), so the import report names it instead of it vanishing.
    """
    skipped = [] if skipped is None else skipped
    if not src.is_dir():
        raise DataError(f"import source {src} is not a folder (expected SRC/<identity>/<image>.jpg)")
    out = []
    for entry in sorted(src.iterdir()):
        if entry.is_symlink() or not entry.is_dir():
            skipped.append((str(entry), "not an identity folder (SRC/<identity>/<image>.jpg|png)"))
            continue
        images = []
        for p in sorted(entry.iterdir()):
            if p.suffix.lower() == ".json" and _regular(p):
                continue  # pose file, read beside its image
            if p.is_dir() and not p.is_symlink():
                skipped.append((str(p), "sub-folder: photos must lie directly in the identity folder"))
            elif not _regular(p):
                skipped.append((str(p), "not a regular file (FIFO, device or symlink)"))
            elif p.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((str(p), f"not a {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} file"))
            else:
                images.append(p)
        if images:
            out.append((entry.name, images))
        else:
            skipped.append((str(entry), "identity folder without a jpg/png photo"))
    if not out:
        shown = "; ".join(f"{Path(p).name}: {why}" for p, why in skipped[:5])
        raise DataError(f"{src} has no <identity>/<image>.jpg|png files (one sub-folder per identity)"
                        + (f"; skipped {shown}" if shown else ""))
    return out


def read_pose(image: Path) -> list[float] | None:
    path = image.with_suffix(".json")
    if not path.is_file():
        return None
    try:
        pose = json.loads(path.read_text())["pose"]
        pose = [float(x) for x in pose]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}: expected {{\"pose\": [yaw, pitch, roll]}} in degrees") from None
    if len(pose) != 3:
        raise DataError(f"{path}: pose must have 3 numbers (yaw, pitch, roll), got {len(pose)}")
    return pose


def align_identity(images: list[Path], resolution: int, report: dict) -> dict | None:
    """Aligned crops of one identity as a group dict, or None if no photo has a face."""
    crops, landmarks, poses = [], [], []
    for path in images:
        try:
            with Image.open(path) as img:
                rgb = convert_8bit(img, "RGB")
        except (OSError, UnidentifiedImageError):
            report["unreadable"].append(str(path))
            continue
        try:
            face = detect_and_align(rgb, resolution, source=str(path))
        except DataError:
            report["no_face"].append(str(path))
            continue
        crops.append((face.image + 1) / 2)
        landmarks.append(face.landmarks)
        poses.append(read_pose(path))
    if not crops:
        return None
    group = {"rgb": torch.stack(crops), "landmarks": torch.stack(landmarks)}
    if all(p is not None for p in poses):
        group["pose"] = torch.tensor(poses)
    return group


def source_digest(identities: list) -> str:
    """sha256 over the names and bytes of one shard's source photos and pose files: a resumed import
    redoes the shard when a photo was added, removed or changed (not only when the folder count did)."""
    digest = hashlib.sha256()
    for _, name, images in identities:
        for image in images:
            for path in (Path(image), Path(image).with_suffix(".json")):
                if path.is_file():
                    digest.update(f"{name}/{path.name}\0".encode())
                    digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _import_shard(job: tuple) -> dict:
    out, index, identities, resolution, keep_pose = job
    report = {"no_face": [], "unreadable": []}
    samples, views = [], 0
    for identity_index, name, images in identities:
        group = align_identity([Path(p) for p in images], resolution, report)
        if group is None:
            continue
        if not keep_pose:
            group.pop("pose", None)  # uniform batches: pose only when every photo has one
        views += group["rgb"].shape[0]
        samples.append((sample_key(identity_index), encode_group(identity_index, group, source=f"import:{name}")))
    entry_name = shard_name(index)
    sha, count = write_tar_atomic(Path(out) / entry_name, samples)
    return {"name": entry_name, "sha256": sha, "samples": count, "first_identity": identities[0][0],
            "views": views, "report": report, "source_sha256": source_digest(identities)}


def import_folder(src: str | Path, out: str | Path, resolution: int = 128, shard_size: int = 64) -> dict:
    """Convert ``src`` into shards under ``out``; returns the import report (also written to OUT)."""
    src, out = Path(src), Path(out)
    skipped: list = []
    identities = scan(src, skipped)
    out.mkdir(parents=True, exist_ok=True)
    keep_pose = all(p.with_suffix(".json").is_file() for _, images in identities for p in images)
    generator = {"importer": "icp.data.shards.imports", "src": src.name, "resolution": resolution,
                 "shard_size": shard_size, "identities": len(identities), "pose": keep_pose}
    done = load_progress(out, generator)
    jobs, entries = [], {}
    indexed = [(i, name, [str(p) for p in images]) for i, (name, images) in enumerate(identities)]
    for k, start in enumerate(range(0, len(indexed), shard_size)):
        chunk = indexed[start:start + shard_size]
        previous = done.get(shard_name(k))
        if is_done(out, previous) and previous.get("source_sha256") == source_digest(chunk):
            entries[shard_name(k)] = previous
        else:
            jobs.append((str(out), k, chunk, resolution, keep_pose))
    # MTCNN is already multi-threaded inside torch: one process
    _run_jobs(out, jobs, entries, generator, workers=1, progress=True, desc="import shards",
              worker_fn=_import_shard)
    shards = [entries[shard_name(k)] for k in range(len(entries))]
    report = {"identities": sum(s["samples"] for s in shards), "images": sum(s.get("views", 0) for s in shards),
              "no_face": [p for s in shards for p in s.get("report", {}).get("no_face", [])],
              "unreadable": [p for s in shards for p in s.get("report", {}).get("unreadable", [])],
              "skipped": [{"path": p, "reason": why} for p, why in skipped],
              "identity_index": {name: i for i, name, _ in indexed}}
    fields = ["landmarks"] + (["pose"] if keep_pose else [])
    write_json_atomic(out / "import_report.json", report)
    write_json_atomic(out / MANIFEST, manifest_dict("import", generator, shards, fields, views=report["images"]))
    (out / PARTIAL_MANIFEST).unlink(missing_ok=True)
    report["report_path"] = str(out / "import_report.json")
    return report
