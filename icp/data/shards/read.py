"""Reading shard folders: a streaming dataset with node/worker splitting, and `check`.

Errors are sorted into two kinds. A *bad sample* (checksum mismatch, undecodable PNG) is skipped
and counted, or stops the run with ``on_bad_sample="fail"``. A *bad shard* (cannot be opened,
truncated, fewer samples than its manifest entry says) stops the run naming the file, or is
skipped and counted with ``on_bad_shard="skip"``.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import random
import re
import tarfile
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from icp.data.shards.format import MAX_PIXELS, decode_group, fields_of, read_manifest, sha256_file
from icp.core.errors import DataError

log = logging.getLogger(__name__)


class BadSample(DataError):
    """A sample that fails to decode while on_bad_sample='fail'."""


def stable_seed(*parts: int) -> int:
    """A 63-bit seed from integers, identical in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# A member bigger than this is skipped unread and its sample counted as bad (a 16-view 1024px
# sample's coords.npy is ~100 MB); the tar stream discards its bytes without holding them.
MAX_MEMBER_BYTES = 256 << 20
_KEY = re.compile(r"[A-Za-z0-9_-]{1,200}")
_SUFFIX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}")


def _split_name(name: str) -> tuple[str, str, str | None]:
    """(key, member, problem) of a tar member name ``<key>.<member>``; problem=None if it is safe."""
    key, dot, member = name.partition(".")
    if not dot or "/" in name or "\\" in name or ".." in name or not _KEY.fullmatch(key) \
            or not _SUFFIX.fullmatch(member):
        return key or name, member, f"member name {name[:80]!r} is not '<key>.<member>' without paths"
    return key, member.lower(), None


def iter_shard(path: Path, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Raw samples (``__key__`` + member bytes) of one uncompressed tar, grouped by key.

    Tar-level errors (unreadable, truncated, compressed) become DataError naming the shard. A
    member that is not a regular file, has an unsafe name (paths, ``..``), repeats, or exceeds
    ``max_member_bytes`` is not read; its sample carries ``__bad__`` (the reason) instead.
    """
    current: dict | None = None
    if not Path(path).is_file():  # also refuses FIFOs and devices, which could block a reader forever
        raise DataError(f"shard {Path(path).name} is missing or not a regular file in {Path(path).parent}")
    try:
        with open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            end = Path(path).stat().st_size
            for info in tar:
                if info.offset_data + max(info.size, 0) > end:
                    # A header may declare any size (1 TiB): skipping it in stream mode would read
                    # block by block to the declared end, for minutes. The file cannot hold it.
                    raise DataError(f"shard {Path(path).name}: member {info.name[:80]!r} declares {info.size} bytes, "
                                    f"past the end of the {end}-byte file (truncated or crafted); "
                                    f"run `icp shards check {Path(path).parent}`")
                key, member, problem = _split_name(info.name)
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": str(path)}
                if problem is None and not info.isreg():
                    problem = f"member {info.name[:80]!r} is not a regular file"
                if problem is None and info.size > max_member_bytes:
                    problem = f"member {member} is {info.size} bytes, over the {max_member_bytes}-byte cap"
                if problem is None and member in current:
                    problem = f"member {member} appears twice"
                if problem is not None:
                    current.setdefault("__bad__", problem)
                    continue
                handle = tar.extractfile(info)
                current[member] = handle.read() if handle is not None else b""
            if current is not None:
                yield current
    except DataError:
        raise
    except Exception as err:  # tarfile, OSError, ...: all mean "this file is bad"
        raise DataError(f"shard {path.name} cannot be read ({type(err).__name__}: {str(err)[:100]}); "
                        f"run `icp shards check {path.parent}`") from None


def members_of(sample: dict) -> dict[str, bytes]:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


class ShardStream(IterableDataset):
    """Decoded identity groups from a shard folder, turned into items by ``transform``.

    ``transform(group, generator)`` returns an iterable of items (e.g. profile/target pairs);
    ``generator`` is a torch.Generator seeded by (seed, epoch, rank, worker), so an epoch is
    reproducible. Splitting: shards go to ranks with ``nodesplitter`` and to DataLoader workers
    with ``workersplitter`` (the WebDataset functions); ``resampled`` draws shards with
    replacement forever (cut by ``items_per_rank``), which keeps DDP ranks in step;
    ``split_samples`` instead sends every rank every shard and keeps sample i on rank
    i % world, truncated so all ranks get the same count (small, fixed validation sets).
    """

    def __init__(
        self,
        folder: str | Path,
        transform: Callable,
        seed: int = 0,
        shardshuffle: bool | int = False,
        shuffle_buffer: int = 0,
        resampled: bool = False,
        items_per_rank: int | None = None,
        split_samples: bool = False,
        on_bad_sample: str = "skip",
        on_bad_shard: str = "fail",
        nodesplitter: Callable = wds.split_by_node,
        workersplitter: Callable = wds.split_by_worker,
        max_member_bytes: int = MAX_MEMBER_BYTES,
        max_pixels: int = MAX_PIXELS,
    ):
        if on_bad_sample not in ("skip", "fail") or on_bad_shard not in ("skip", "fail"):
            raise DataError(f"on_bad_sample/on_bad_shard must be 'skip' or 'fail', got {on_bad_sample!r}/{on_bad_shard!r}")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.entries = list(self.manifest["shards"])
        if not self.entries:
            raise DataError(f"{self.folder / 'manifest.json'} lists no shards; re-create the folder")
        self.transform, self.seed = transform, seed
        self.shardshuffle, self.shuffle_buffer = shardshuffle, shuffle_buffer
        self.resampled, self.items_per_rank, self.split_samples = resampled, items_per_rank, split_samples
        self.on_bad_sample, self.on_bad_shard = on_bad_sample, on_bad_shard
        self.nodesplitter, self.workersplitter = nodesplitter, workersplitter
        self.max_member_bytes, self.max_pixels = max_member_bytes, max_pixels
        # Every emitted group has exactly the manifest's fields, so batches always collate.
        fields = self.manifest["fields"]
        self.fields = sorted(set(fields.get("present", [])) - {"identity_index", "source"})
        # Per-view shapes of the first good group this process saw; later groups must match
        # (a sample of another size or landmark count would crash batching in a worker).
        self._signature: dict | None = None
        # (rank, world) captured in the main process by the DataModule from its Trainer: DataLoader
        # workers started with spawn (or on some launchers) see neither RANK env vars nor an
        # initialised process group, and would all act as rank 0.
        self.rank_world: tuple[int, int] | None = None
        # Shared across DataLoader worker processes, so the main process sees the workers' counts
        # and the workers see the epoch the trainer set (also with persistent workers).
        self._epoch = mp.Value("q", 0)
        # Resumable position (ShardDataModule): {"epoch", "skip": {logical worker: items},
        # "rotation"}, read when an iterator is made; and the batch key naming the
        # logical worker of each item, so the main process can count what each worker gave.
        self.resume: dict | None = None
        self.worker_key: str | None = None
        self._bad_samples = mp.Value("q", 0)
        self._bad_shards = mp.Value("q", 0)

    # -- counters and epoch
    @property
    def bad_samples(self) -> int:
        return int(self._bad_samples.value)

    @property
    def bad_shards(self) -> int:
        return int(self._bad_shards.value)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    @property
    def num_samples(self) -> int:
        return sum(int(e["samples"]) for e in self.entries)

    def _admit(self, group: dict, where: str) -> None:
        _admit_group(self, group, where)

    # -- iteration
    def __iter__(self) -> Iterator:
        """One pass (epoch) of this rank/worker's stream.

        The stream is a pure function of (seed, epoch, rank, logical worker): shard order, the
        shuffle buffer's rng and the pair/mask generator are all seeded from them, so a pass can
        be resumed at item k by replaying it and dropping the first k (``resume``). A plain
        function returning a generator: ``resume`` is read when the iterator is made (DataLoader
        workers are forked then), not at the first ``next``.
        """
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        if self.rank_world is not None:
            rank, world = self.rank_world
        epoch = int(self._epoch.value)
        resume = self.resume if self.resume is not None and self.resume.get("epoch") == epoch else None
        # DataLoader worker slot -> logical worker: a resumed pass starts its round robin at the
        # worker after the one that gave the last trained batch (see ShardDataModule.state_dict).
        worker = (worker + int(resume.get("rotation", 0))) % workers if resume else worker
        skip = int(resume.get("skip", {}).get(worker, 0)) if resume else 0
        return self._iterate(epoch, rank, world, worker, workers, skip)

    def _iterate(self, epoch: int, rank: int, world: int, worker: int, workers: int, skip: int) -> Iterator:
        generator = torch.Generator().manual_seed(stable_seed(self.seed, epoch, rank, worker))
        rng = random.Random(stable_seed(self.seed, epoch, rank, worker, 1))
        if self.resampled:
            shards = self._resampled(rng)
        else:
            order = list(self.entries)
            if self.shardshuffle:
                # same permutation on every rank and worker (seeded by epoch only), then split
                random.Random(stable_seed(self.seed, epoch)).shuffle(order)
            if self.split_samples:
                shards = order
            elif self.rank_world is not None:
                shards = order[rank::world]  # what wds.split_by_node does, with the captured rank
            else:
                shards = self.nodesplitter(order)
            # what wds.split_by_worker does, with the logical worker id
            shards = islice(shards, worker, None, workers) if self.workersplitter is wds.split_by_worker \
                else self.workersplitter(shards)
        groups = self._groups(shards)
        if self.split_samples:
            groups = self._split_samples(groups, rank, world)
        items = (item for group in groups for item in self.transform(group, generator))
        if self.shuffle_buffer > 1:
            items = _shuffled(items, self.shuffle_buffer, rng)
        if self.items_per_rank is not None:
            share, extra = divmod(self.items_per_rank, workers)
            items = islice(items, share + (1 if worker < extra else 0))
        if skip:
            # Replayed, not stored: every rng above advances exactly as in the first pass.
            items = islice(items, skip, None)
        if self.worker_key is not None:
            items = (_tagged(item, self.worker_key, worker) for item in items)
        yield from items

    def _resampled(self, rng: random.Random) -> Iterator[dict]:
        while True:
            yield rng.choice(self.entries)

    def _split_samples(self, groups: Iterator[dict], rank: int, world: int) -> Iterator[dict]:
        limit = (self.num_samples // world) * world
        for group in groups:
            index = group["_index"]
            if index < limit and index % world == rank:
                yield group

    def _groups(self, shards) -> Iterator[dict]:
        """Good groups of ``shards``; a pass (or, resampled, 2 x shards reads in a row) without one
        good group after rejections is a one-line DataError: skipping forever would loop over empty
        epochs (Lightning's max_steps is never reached) and print a warning per sample."""
        offsets, total = {}, 0
        for entry in self.entries:
            offsets[entry["name"]] = total
            total += int(entry["samples"])
        tally = {"bad": 0, "first": None}
        window, since_good, any_good = 2 * len(self.entries), 0, False
        for entry in shards:
            got = False
            for group in self._shard_groups(entry, offsets[entry["name"]], tally):
                got = any_good = True
                yield group
            since_good = 0 if got else since_good + 1
            if self.resampled and since_good >= window:
                raise self._no_valid_sample(tally, f"{since_good} shard reads in a row")
        if not any_good and tally["bad"]:
            raise self._no_valid_sample(tally, "this epoch")

    def _no_valid_sample(self, tally: dict, span: str) -> DataError:
        first = f"; first: {str(tally['first'])[:200]}" if tally["first"] else ""
        return DataError(f"no valid sample in {self.folder} ({span}: {tally['bad']} samples or shards rejected, none "
                         f"usable{first}); run `icp shards check {self.folder}`")

    def _shard_groups(self, entry: dict, offset: int, tally: dict | None = None) -> Iterator[dict]:
        tally = {"bad": 0, "first": None} if tally is None else tally
        path = self.folder / entry["name"]
        seen = 0
        try:
            for sample in iter_shard(path, self.max_member_bytes):
                where = f"{entry['name']}:{sample.get('__key__')}"
                seen += 1
                try:
                    if "__bad__" in sample:
                        raise DataError(f"{where}: {sample['__bad__']}")
                    group = decode_group(members_of(sample), where, max_pixels=self.max_pixels)
                    self._admit(group, where)
                except DataError as err:
                    if self.on_bad_sample == "fail":
                        raise BadSample(f"{err} (on_bad_sample=skip would skip it)") from None
                    with self._bad_samples.get_lock():
                        self._bad_samples.value += 1
                    tally["bad"] += 1
                    tally["first"] = tally["first"] or err
                    log.warning("skipping bad sample: %s", err)
                    continue
                group["_index"] = offset + seen - 1
                group["_key"] = sample["__key__"]
                yield group
            if seen != int(entry["samples"]):
                raise DataError(f"shard {entry['name']} ended after {seen} of {entry['samples']} samples "
                                f"(truncated or corrupt); run `icp shards check {self.folder}`")
        except BadSample:
            raise
        except DataError as err:
            if self.on_bad_shard == "fail":
                raise DataError(f"{err} (set on_bad_shard=skip to train without it)") from None
            with self._bad_shards.get_lock():
                self._bad_shards.value += 1
            tally["bad"] += 1
            tally["first"] = tally["first"] or err
            log.warning("skipping rest of bad shard: %s", err)


def _shape_signature(group: dict) -> dict:
    return {k: (v.dtype, tuple(v.shape[1:])) for k, v in group.items() if isinstance(v, torch.Tensor)}


def _admit_group(stream: "ShardStream", group: dict, where: str) -> None:
    have = fields_of(group)
    if have != stream.fields:
        missing, extra = sorted(set(stream.fields) - set(have)), sorted(set(have) - set(stream.fields))
        raise DataError(f"{where}: fields differ from the manifest's (missing {missing}, unexpected {extra})")
    signature = _shape_signature(group)
    if stream._signature is None:
        stream._signature = signature
        return
    for name, (dtype, shape) in signature.items():
        ref = stream._signature.get(name)
        if ref is not None and ref != (dtype, shape):
            raise DataError(f"{where}: '{name}' has per-view shape {shape} ({dtype}), earlier samples "
                            f"{ref[1]} ({ref[0]}); samples of one folder must batch together")


def _tagged(item, key: str, worker: int):
    if isinstance(item, dict):
        item[key] = worker
    return item


def _shuffled(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle buffer with an explicit rng (deterministic per epoch)."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= bufsize:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


# ------------------------------------------------------------------------------------- check


def check(folder: str | Path, decode: bool = True) -> dict:
    """Validate every shard of ``folder`` against its manifest; raise DataError naming the first bad one.

    Checks sha256, sample count, that every sample decodes (crc of each member), and that each
    sample has the manifest's fields. Returns counts on success.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    present = set(manifest["fields"]["present"]) | set(manifest["fields"]["required"])
    samples = views = 0
    for entry in manifest["shards"]:
        path = folder / entry["name"]
        if not path.is_file():
            raise DataError(f"shard {entry['name']} listed in the manifest is missing from {folder}")
        sha = sha256_file(path)
        if sha != entry["sha256"]:
            raise DataError(f"shard {entry['name']}: sha256 mismatch (file changed or corrupt); re-create it")
        count = 0
        for sample in iter_shard(path):
            count += 1
            if "__bad__" in sample:
                raise DataError(f"shard {entry['name']}:{sample['__key__']}: {sample['__bad__']}")
            if decode:
                group = decode_group(members_of(sample), f"{entry['name']}:{sample['__key__']}")
                have = {k for k in present if group.get(k) is not None}
                if have != present:
                    raise DataError(f"shard {entry['name']}:{sample['__key__']} lacks fields {sorted(present - have)}")
                views += group["rgb"].shape[0]
        if count != int(entry["samples"]):
            raise DataError(f"shard {entry['name']}: {count} samples, manifest says {entry['samples']}")
        samples += count
    return {"shards": len(manifest["shards"]), "samples": samples, "views": views,
            "fields": sorted(present), "kind": manifest.get("kind")}
