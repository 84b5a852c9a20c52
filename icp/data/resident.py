"""Every view of a shard folder decoded once and held in memory: a loader that costs nothing.

For a task that reads only whole target images (``K.TARGET``, ``K.IDENTITY``): the base pretrain
(icp/tasks/pretrain.py). The streaming :class:`~icp.data.datamodule.ShardDataModule` decodes an
identity's PNGs and ground-truth arrays and makes a masked pair per sample: one loader process
served ~31 samples/s on this project's (loaded) CPU, and the 64-px base on one H100 consumed ~380
samples/s from 12 workers (2.96 steps/s at batch 128), so the loader was likely what held it
(not measured on that machine). 8,192 views of 64 px are 100 MB as uint8, which any host holds.

Batches are a pure function of (seed, batch number, rank): batch ``g`` of rank ``r`` is a slice of
the permutation of epoch ``g // batches_per_epoch``. The loader starts at the batch number that
the restored global step implies (Lightning restores the step before it asks for the loader), so
a resumed run sees exactly the batches an uninterrupted one would, whatever was prefetched.
Images travel as uint8 and become [-1, 1] floats on the device (``on_after_batch_transfer``).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from icp.core.errors import ConfigError, DataError
from icp.data import keys as K
from icp.data.datamodule import resize_group
from icp.data.shards.format import decode_group, read_manifest, shard_name
from icp.data.shards.read import iter_shard, members_of, stable_seed

MAX_BYTES = 16 << 30  # refuse to hold more than this in memory (say which loader to use instead)


def _load_shard(path: str, resolution: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, ids = [], []
    for sample in iter_shard(Path(path)):
        where = f"{Path(path).name}:{sample['__key__']}"
        if "__bad__" in sample:
            raise DataError(f"{where}: {sample['__bad__']}; run `icp shards check {Path(path).parent}`")
        group = decode_group(members_of(sample), where)
        if resolution is not None:
            group = resize_group(group, resolution)
        rgb = (group["rgb"] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        images.append(rgb)
        ids.append(np.full(len(rgb), int(group["identity_index"]), dtype=np.int64))
    if not images:
        return np.zeros((0, 3, 1, 1), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(ids)


def load_views(folder: str | Path, resolution: int | None = None, workers: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All views of a shard folder as (N, 3, H, W) uint8 and their (N,) identity indices."""
    folder = Path(folder)
    manifest = read_manifest(folder)  # one-line DataError for a missing/broken folder
    paths = [str(folder / s.get("name", shard_name(i))) for i, s in enumerate(manifest["shards"])]
    side = int(resolution or (manifest.get("generator") or {}).get("resolution") or 0)
    views = int((manifest.get("counts") or {}).get("views") or 0)
    if side and views and views * 3 * side * side > MAX_BYTES:
        raise ConfigError(f"{folder}: {views} views of {side} px are over {MAX_BYTES >> 30} GiB in memory; "
                          "use icp.data.datamodule.ShardDataModule (streams them)")
    workers = max(1, min(int(workers), len(paths)))
    if workers == 1:
        parts = [_load_shard(p, resolution) for p in paths]
    else:
        with cf.ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_load_shard, paths, [resolution] * len(paths)))
    parts = [p for p in parts if len(p[0])]
    if not parts:
        raise DataError(f"{folder}: no views in its shards; render some with `icp shards synth {folder}`")
    return torch.from_numpy(np.concatenate([p[0] for p in parts])), torch.from_numpy(np.concatenate([p[1] for p in parts]))


class _Batches(Dataset):
    """Item ``g`` = training batch number ``g`` (the sampler says which numbers to give)."""

    def __init__(self, images: torch.Tensor, ids: torch.Tensor, batch_size: int, seed: int, rank: int, world: int):
        self.images, self.ids, self.batch_size, self.seed = images, ids, batch_size, seed
        self.rank, self.world = rank, world
        self.per_epoch = max(1, len(images) // (batch_size * world))
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:  # the sampler decides; this is only the size of an epoch
        return self.per_epoch

    def __getitem__(self, g: int) -> dict:
        epoch, i = divmod(int(g), self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(stable_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(len(self.images), generator=gen))
        start = (i * self.world + self.rank) * self.batch_size
        idx = self._perm[1][start:start + self.batch_size]
        return {K.TARGET: self.images[idx], K.IDENTITY: self.ids[idx]}


class _From(Sampler):
    """Batch numbers from the current global position (asked when an epoch's iterator is made)."""

    def __init__(self, start, count: int):
        self.start, self.count = start, count

    def __iter__(self):
        first = int(self.start())
        return iter(range(first, first + self.count))

    def __len__(self) -> int:
        return self.count


class ResidentImages(L.LightningDataModule):
    """Target images of ``shards`` (training) and ``val_shards`` (held out), held in memory.

    ``batch_size`` per device; ``resolution``: resize on load (None: as rendered); ``workers``:
    processes that decode the shards once at set-up; ``val_batches``: validation batches (the
    first held-out views, in order). Other keys of the stage configs' data node (``mask_ratio``,
    ``patch_size``, ``with_flow``, ``num_workers``) are accepted and unused: it serves whole images.
    """

    def __init__(self, shards: str, val_shards: str | None = None, batch_size: int = 128, resolution: int | None = None,
                 seed: int = 0, workers: int = 8, val_batches: int = 8, num_workers: int = 0,
                 mask_ratio: float | None = None, patch_size: int | None = None, with_flow: bool = False):
        super().__init__()
        if int(batch_size) < 1:
            raise ConfigError(f"data.batch_size={batch_size}: use 1 or more")
        self.shards, self.val_shards = shards, val_shards
        self.batch_size, self.resolution, self.seed = int(batch_size), resolution, int(seed)
        self.workers, self.val_batches = int(workers), int(val_batches)
        self.train_images = self.val_images = None
        self.load_seconds = 0.0

    def setup(self, stage: str | None = None) -> None:
        if self.train_images is not None:
            return
        start = time.perf_counter()
        self.train_images, self.train_ids = load_views(self.shards, self.resolution, self.workers)
        if self.val_shards:
            self.val_images, self.val_ids = load_views(self.val_shards, self.resolution, self.workers)
        self.load_seconds = time.perf_counter() - start

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _position(self) -> int:
        """Training batches already consumed (Lightning restores global_step before the loader runs)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.global_step) * int(getattr(trainer, "accumulate_grad_batches", 1) or 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        data = _Batches(self.train_images, self.train_ids, self.batch_size, self.seed, rank, world)
        return DataLoader(data, batch_size=None, sampler=_From(self._position, data.per_epoch), num_workers=0)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_images is None:
            return []
        n = min(len(self.val_images), self.val_batches * self.batch_size)
        items = [{K.TARGET: self.val_images[i:i + self.batch_size], K.IDENTITY: self.val_ids[i:i + self.batch_size]}
                 for i in range(0, n, self.batch_size)]
        return DataLoader(items, batch_size=None, num_workers=0)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if batch[K.TARGET].dtype == torch.uint8:  # [0, 255] -> [-1, 1] on the device
            batch = {**batch, K.TARGET: batch[K.TARGET].float().div_(127.5).sub_(1.0)}
        return batch
