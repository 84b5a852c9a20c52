"""Writing shard folders: deterministic tars, atomic files, resumable synthetic generation.

A folder holds ``shard-NNNNNN.tar`` files and a ``manifest.json`` written last (atomically).
While a run is in progress ``manifest.partial.json`` records every finished shard with its
sha256, so re-running the same command after a crash (or a SLURM requeue) skips shards whose
file still matches and renders only the rest; a different generator config is refused.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tarfile
import time
from pathlib import Path
from typing import Iterable

from icp.data.shards.format import (
    MANIFEST,
    OPTIONAL_FIELDS,
    PARTIAL_MANIFEST,
    REQUIRED_FIELDS,
    SCHEMA_VERSION,
    encode_group,
    fields_of,
    read_manifest,
    sample_key,
    sha256_file,
    shard_name,
    write_json_atomic,
)
from icp.core.errors import DataError


def write_tar_atomic(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[str, int]:
    """Write ``(key, members)`` samples to ``path`` via ``path.tmp`` + rename; returns (sha256, count).

    Headers carry no time or user, so the same samples always give the same bytes (and sha).
    """
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                if "." in key:
                    raise DataError(f"sample key '{key}' contains a dot; WebDataset would split it")
                for member in sorted(members):
                    data = members[member]
                    info = tarfile.TarInfo(f"{key}.{member}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    tar.addfile(info, fileobj=_Bytes(data))
                count += 1
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return sha256_file(path), count


class _Bytes:
    """Minimal file object for tar.addfile without copying bytes into a BytesIO."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out = self.data[self.pos:end]
        self.pos += len(out)
        return out


def manifest_dict(kind: str, generator: dict, shards: list[dict], fields: list[str], views: int) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "generator": generator,
        "fields": {"required": list(REQUIRED_FIELDS), "present": fields,
                   "optional": [f for f in OPTIONAL_FIELDS]},
        "counts": {"shards": len(shards), "samples": sum(s["samples"] for s in shards), "views": views},
        "shards": shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def load_progress(out: Path, generator: dict) -> dict[str, dict]:
    """Finished shards recorded in a previous run with the same generator config (name -> entry)."""
    for name in (MANIFEST, PARTIAL_MANIFEST):
        path = out / name
        if path.is_file():
            manifest = read_manifest(path) if name == MANIFEST else _read_partial(path)
            if manifest.get("generator") != generator:
                raise DataError(
                    f"{path} was made with a different generator config ({_diff(manifest.get('generator'), generator)}); "
                    "use a new output folder or the original options")
            return {s["name"]: s for s in manifest["shards"]}
    if any(out.glob("*.tar")):
        raise DataError(f"{out} holds .tar files but no manifest; use an empty output folder")
    return {}


def _read_partial(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except ValueError:
        return {"generator": None, "shards": []}


def _diff(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "unreadable"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def is_done(out: Path, entry: dict | None) -> bool:
    return entry is not None and (out / entry["name"]).is_file() and sha256_file(out / entry["name"]) == entry["sha256"]


# ---------------------------------------------------------------------------- synthetic data


def _render_shard(job: tuple) -> dict:
    """Render identities [first, last) into one shard (runs in a worker process)."""
    out, index, first, last, views, resolution, seed = job
    import torch

    from icp.render.renderer import render_group

    torch.set_num_threads(1)  # one process per core: threads inside would oversubscribe
    fields: list[str] = []

    def samples():
        for identity in range(first, last):
            group = dict(render_group(identity, views, resolution, seed))
            group["identity_params"] = group.pop("identity", None)  # "identity" in batches is the index
            fields[:] = fields_of(group)
            yield sample_key(identity), encode_group(identity, group, source="synthetic")

    name = shard_name(index)
    sha, count = write_tar_atomic(Path(out) / name, samples())
    return {"name": name, "sha256": sha, "samples": count, "first_identity": first, "fields": fields}


def synth(
    out: str | Path,
    identities: int,
    views: int,
    resolution: int,
    seed: int = 0,
    workers: int = 1,
    shard_size: int = 64,
    first_identity: int = 0,
    progress: bool = True,
) -> dict:
    """Render ``identities`` synthetic identities x ``views`` views into shards under ``out``.

    Shard k holds the contiguous identity range [first + k*shard_size, ...), so the output does
    not depend on ``workers``. Returns the manifest.
    """
    if identities < 1 or views < 2 or resolution < 8 or shard_size < 1:
        raise DataError("icp shards synth: need --identities >= 1, --views >= 2 (pairs need two views), "
                        "--resolution >= 8 and --shard-size >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = {"renderer": "icp.render.renderer", "identities": identities, "views": views,
                 "resolution": resolution, "seed": seed, "shard_size": shard_size,
                 "first_identity": first_identity}
    done = load_progress(out, generator)
    jobs, entries = [], {}
    for k, start in enumerate(range(0, identities, shard_size)):
        name = shard_name(k)
        if is_done(out, done.get(name)):
            entries[name] = done[name]
        else:
            jobs.append((str(out), k, first_identity + start, first_identity + min(start + shard_size, identities),
                         views, resolution, seed))
    _run_jobs(out, jobs, entries, generator, workers, progress, desc="render shards")
    shards = [entries[shard_name(k)] for k in range(len(entries))]
    fields = shards[0].get("fields", []) if shards else []
    manifest = manifest_dict("synthetic", generator, shards, fields, views=views * identities)
    write_json_atomic(out / MANIFEST, manifest)
    (out / PARTIAL_MANIFEST).unlink(missing_ok=True)
    return manifest


def _run_jobs(out: Path, jobs: list, entries: dict, generator: dict, workers: int, progress: bool, desc: str,
              worker_fn=None) -> None:
    worker_fn = worker_fn or _render_shard
    from tqdm import tqdm

    bar = tqdm(total=len(jobs) + len(entries), initial=len(entries), desc=desc, disable=not progress, unit="shard")

    def record(entry: dict) -> None:
        entries[entry["name"]] = entry
        write_json_atomic(out / PARTIAL_MANIFEST, {"generator": generator, "shards": list(entries.values())})
        bar.update(1)

    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                record(worker_fn(job))
        else:
            # spawn, not fork: the parent may hold torch thread pools that do not survive a fork
            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for entry in pool.imap_unordered(worker_fn, jobs):
                    record(entry)
    finally:
        bar.close()  # ends the progress line, so an error message starts a line of its own
