"""LightningDataModule over shard folders: profile/target pairs of one identity (paper §3).

Each shard sample is one identity with V views. A training item picks two different views of
it: the profile ``I_p`` and the target ``I_l``; the target is patch-masked into ``I'_l``
(Lighting-Aware Stitching, §3.1) and, when the shards carry surface coordinates, the true
target->profile flow supervises/measures the matching (§3.2). Batches follow icp/data/keys.py.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

import lightning as L
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader

from icp.data import keys as K
from icp.data.masking import apply_mask, random_patch_mask
from icp.data.shards.read import ShardStream, stable_seed
from icp.core.errors import ConfigError

log = logging.getLogger(__name__)


def resize_group(group: dict, resolution: int) -> dict:
    """Resample every view to resolution x resolution (images smooth, labels nearest)."""
    height, width = group["rgb"].shape[-2:]
    if (height, width) == (resolution, resolution):
        return group
    out = dict(group)
    size = (resolution, resolution)
    out["rgb"] = F.interpolate(group["rgb"], size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    for name in ("fg", "coords", "depth"):
        if group.get(name) is not None:
            # nearest: averaging coordinates or depth across a silhouette edge invents surface points
            out[name] = F.interpolate(group[name], size=size, mode="nearest")
    if group.get("landmarks") is not None:
        # pixel centres sit at integers (renderer convention) and the images resample with
        # align_corners=False, so centres map as (x + 0.5) * s - 0.5, not x * s
        scale = torch.tensor([resolution / width, resolution / height])
        out["landmarks"] = (group["landmarks"] + 0.5) * scale - 0.5
    return out


class PairMaker:
    """Turns one decoded identity group into training items (a picklable callable for workers).

    ``fixed=True`` (validation) derives the pair and the mask from (seed, identity, j) only, so
    every epoch, rank layout and worker count sees the same items.
    """

    def __init__(self, resolution: int | None, mask_ratio: float, patch_size: int, pairs_per_identity: int,
                 seed: int = 0, fixed: bool = False, images_only: bool = False, with_flow: bool = True):
        self.resolution, self.mask_ratio, self.patch_size = resolution, mask_ratio, patch_size
        self.pairs, self.seed, self.fixed = pairs_per_identity, seed, fixed
        self.images_only, self.with_flow = images_only, with_flow

    def __call__(self, group: dict, generator: torch.Generator) -> Iterator[dict]:
        if self.resolution is not None:
            group = resize_group(group, self.resolution)
        views = group["rgb"].shape[0]
        identity = torch.tensor(group["identity_index"], dtype=torch.int64)
        if self.images_only:
            for v in range(views):
                item = {K.PROFILE: group["rgb"][v] * 2 - 1, K.IDENTITY: identity}
                item.update(_view_fields(group, v, "profile"))
                yield item
            return
        if views < 2:
            return  # a pair needs two views; the importer reports such identities
        for j in range(self.pairs):
            g = torch.Generator().manual_seed(stable_seed(self.seed, group["identity_index"], j)) if self.fixed else generator
            p = int(torch.randint(views, (1,), generator=g))
            t = int(torch.randint(views - 1, (1,), generator=g))
            t += int(t >= p)  # a different view than the profile
            yield self._pair(group, p, t, identity, g)

    def _pair(self, group: dict, p: int, t: int, identity: torch.Tensor, g: torch.Generator) -> dict:
        target = group["rgb"][t] * 2 - 1
        keep = random_patch_mask((1, *target.shape[-2:]), self.mask_ratio, self.patch_size, generator=g)[0]
        item = {
            K.PROFILE: group["rgb"][p] * 2 - 1,
            K.TARGET: target,
            K.TARGET_MASKED: apply_mask(target, keep),
            K.TARGET_KEEP: keep,
            K.IDENTITY: identity,
        }
        item.update(_view_fields(group, p, "profile"))
        item.update(_view_fields(group, t, "target"))
        if self.with_flow and all(group.get(n) is not None for n in ("coords", "fg", "depth", "pose")):
            from icp.render.renderer import ground_truth_flow

            def view(i: int) -> dict:
                return {n: group[n][i:i + 1] for n in ("coords", "fg", "depth")}

            flow, valid = ground_truth_flow(view(t), view(p), group["pose"][p:p + 1], target.shape[-1])
            item[K.FLOW_GT], item[K.FLOW_VALID] = flow[0], valid[0].float()
        return item


WORKER_KEY = "_stream_worker"  # batch key: the logical worker that made it (removed before the task sees it)


class _Position:
    """Items per logical worker given to trained batches in one epoch, and the last batch's worker."""

    def __init__(self, epoch: int = 0, workers: int = 1, consumed: dict | None = None, last: int | None = None):
        self.epoch, self.workers, self.last = epoch, workers, last
        self.consumed: dict[int, int] = consumed or {}

    def took(self, worker: int, items: int) -> None:
        self.consumed[worker] = self.consumed.get(worker, 0) + items
        self.last = worker


def _view_fields(group: dict, v: int, role: str) -> dict:
    names = {"fg": f"{role}_fg", "coords": f"{role}_coords", "pose": f"{role}_pose",
             "light": f"{role}_light", "landmarks": f"{role}_landmarks",
             "landmarks_visible": f"{role}_landmarks_visible"}
    return {key: group[name][v] for name, key in names.items() if group.get(name) is not None}


class _EpochLoader(DataLoader):
    """A DataLoader that tells its dataset the epoch before each pass.

    Lightning only calls ``set_epoch`` on samplers, which iterable datasets do not have.
    ``on_iter(epoch)`` runs before the workers start (the datamodule sets the resume position).
    """

    def __init__(self, *args, epoch_fn: Callable[[], int] | None = None,
                 on_iter: Callable[[int], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_fn, self.on_iter = epoch_fn, on_iter

    def __iter__(self):
        if self.epoch_fn is not None:
            epoch = self.epoch_fn()
            self.dataset.set_epoch(epoch)
            if self.on_iter is not None:
                self.on_iter(epoch)
        return super().__iter__()


class ShardDataModule(L.LightningDataModule):
    """Batches of profile/target pairs (or single views with ``images_only``) from shard folders.

    ``samples_per_epoch`` counts training items over all ranks; under DDP (or when set) shards
    are resampled with replacement and each rank/worker yields a fixed share, so ranks never
    run out of data at different times (uneven shards hang NCCL at epoch end).

    Resumable (Lightning's stateful-datamodule hooks, saved in every checkpoint): each worker's
    stream is a pure function of (seed, epoch, rank, worker) (ShardStream), so the state is the
    epoch, the items each worker has given to *trained* batches (counted in
    ``on_before_batch_transfer``, i.e. after Lightning's one-batch look-ahead) and the worker
    of the last one. A resumed pass replays each worker's stream to its position and starts the
    DataLoader's round robin at the next worker, so the next batch is the one the uninterrupted
    run trained on next (docs/decisions/slurm.md).
    """

    def __init__(
        self,
        shards: str,
        val_shards: str | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        resolution: int | None = None,
        mask_ratio: float = 0.8,
        patch_size: int = 8,
        pairs_per_identity: int = 4,
        val_pairs_per_identity: int = 2,
        seed: int = 0,
        shardshuffle: bool | int = True,
        shuffle_buffer: int = 256,
        samples_per_epoch: int | None = None,
        resampled: bool | None = None,
        on_bad_sample: str = "skip",
        on_bad_shard: str = "fail",
        images_only: bool = False,
        with_flow: bool = True,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ):
        super().__init__()
        for name, value in (("on_bad_sample", on_bad_sample), ("on_bad_shard", on_bad_shard)):
            if value not in ("skip", "fail"):
                raise ConfigError(f"data.{name}={value!r}: use 'skip' or 'fail'")
        if batch_size < 1 or num_workers < 0 or pairs_per_identity < 1:
            raise ConfigError("data: batch_size and pairs_per_identity must be >= 1 and num_workers >= 0")
        self.shards, self.val_shards = shards, val_shards
        self.batch_size, self.num_workers = batch_size, num_workers
        self.resolution, self.seed = resolution, seed
        self.mask_ratio, self.patch_size = mask_ratio, patch_size
        self.pairs_per_identity, self.val_pairs_per_identity = pairs_per_identity, val_pairs_per_identity
        self.shardshuffle, self.shuffle_buffer = shardshuffle, shuffle_buffer
        self.samples_per_epoch, self.resampled = samples_per_epoch, resampled
        self.on_bad_sample, self.on_bad_shard = on_bad_sample, on_bad_shard
        self.images_only, self.with_flow = images_only, with_flow
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.train_set: ShardStream | None = None
        self.val_set: ShardStream | None = None
        self._position = _Position()
        self._restored: dict | None = None
        random_patch_mask((1, 8, 8), mask_ratio, patch_size)  # validate the masking knobs now

    # -- counters a task or callback logs
    @property
    def bad_samples(self) -> int:
        return sum(s.bad_samples for s in (self.train_set, self.val_set) if s is not None)

    @property
    def bad_shards(self) -> int:
        return sum(s.bad_shards for s in (self.train_set, self.val_set) if s is not None)

    def _rank_world(self) -> tuple[int, int] | None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return None  # no Trainer: the stream reads RANK/WORLD_SIZE or torch.distributed itself

    def _world(self) -> int:
        rank_world = self._rank_world()
        return rank_world[1] if rank_world else wds.utils.pytorch_worker_info()[1]

    def _maker(self, fixed: bool, pairs: int) -> PairMaker:
        return PairMaker(self.resolution, self.mask_ratio, self.patch_size, pairs, seed=self.seed,
                         fixed=fixed, images_only=self.images_only, with_flow=self.with_flow)

    def setup(self, stage: str | None = None) -> None:
        world = self._world()
        if self.train_set is None and stage in (None, "fit"):
            resampled = self.resampled if self.resampled is not None else (world > 1 or self.samples_per_epoch is not None)
            maker = self._maker(fixed=False, pairs=self.pairs_per_identity)
            self.train_set = ShardStream(
                self.shards, maker, seed=self.seed, shardshuffle=self.shardshuffle,
                shuffle_buffer=self.shuffle_buffer, resampled=resampled,
                on_bad_sample=self.on_bad_sample, on_bad_shard=self.on_bad_shard)
            per_identity = self._views_hint(self.train_set) if self.images_only else self.pairs_per_identity
            total = self.samples_per_epoch or self.train_set.num_samples * per_identity
            self.train_set.items_per_rank = total // world if resampled else None
            self.train_set.rank_world = self._rank_world()
        if self.val_set is None and self.val_shards and stage in (None, "fit", "validate"):
            self.val_set = ShardStream(
                self.val_shards, self._maker(fixed=True, pairs=self.val_pairs_per_identity), seed=self.seed,
                shardshuffle=False, shuffle_buffer=0, resampled=False, split_samples=world > 1,
                on_bad_sample=self.on_bad_sample, on_bad_shard=self.on_bad_shard)
            self.val_set.rank_world = self._rank_world()

    @staticmethod
    def _views_hint(stream: ShardStream) -> int:
        views = stream.manifest["counts"].get("views", 0)
        return max(1, round(views / max(1, stream.num_samples)))

    def _loader(self, dataset: ShardStream, epoch_fn, on_iter=None) -> DataLoader:
        workers = self.num_workers
        # Its own generator: making an iterator (train each epoch, val at every check) then never
        # draws from the global RNG, so the training's random stream does not depend on when
        # loaders are iterated (a resumed run makes them at other moments). The streams do not
        # use the worker seeds it gives (they seed themselves from seed/epoch/rank/worker).
        return _EpochLoader(
            dataset, batch_size=self.batch_size, num_workers=workers, pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0, epoch_fn=epoch_fn, on_iter=on_iter,
            generator=torch.Generator().manual_seed(stable_seed(self.seed, 2)))

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        self.train_set.worker_key = WORKER_KEY
        return self._loader(self.train_set, self._current_epoch, self._start_pass)

    # -- resumable position (Lightning calls these on the datamodule)
    def _start_pass(self, epoch: int) -> None:
        """A train iterator is being made for ``epoch``: resume inside it, or start it afresh."""
        restored, self._restored = self._restored, None
        self.train_set.resume = None
        if restored is not None and restored.get("finished") and int(restored["epoch"]) == epoch:
            # Saved after the epoch's last batch: Lightning makes this iterator before it moves
            # to the next epoch (icp.cluster.preemption._mend_epoch_end), so it is the next one's pass.
            epoch += 1
            self.train_set.set_epoch(epoch)
        self._position = _Position(epoch=epoch, workers=max(1, self.num_workers))
        if restored is None or int(restored["epoch"]) != epoch:
            return  # a new epoch (also after an end-of-epoch checkpoint Lightning moved past)
        here = {"workers": max(1, self.num_workers), "world": self._world(), "batch_size": self.batch_size}
        if any(restored.get(k) != v for k, v in here.items()):
            log.warning("data position not restored: the checkpoint was made with %s, this run has %s; "
                        "epoch %d restarts from its first batch", {k: restored.get(k) for k in here}, here, epoch)
            return
        consumed = {int(w): int(n) for w, n in restored["consumed"].items()}
        self._position = _Position(epoch=epoch, workers=here["workers"], consumed=dict(consumed),
                                   last=restored["last"])
        rotation = 0 if restored["last"] is None else (int(restored["last"]) + 1) % here["workers"]
        self.train_set.resume = {"epoch": epoch, "skip": consumed, "rotation": rotation}

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and WORKER_KEY in batch:
            workers = batch.pop(WORKER_KEY)
            trainer = getattr(self, "trainer", None)
            if trainer is None or trainer.training:
                self._position.took(int(workers[0]), len(workers))
        return batch

    def state_dict(self) -> dict:
        """Where the train stream stands after the last trained batch (rank 0's; all ranks get
        equal shares under DDP, so their per-worker counts agree)."""
        trainer = getattr(self, "trainer", None)
        finished = bool(trainer is not None and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        pos = self._position
        return {"version": 1, "epoch": pos.epoch, "consumed": dict(pos.consumed), "last": pos.last,
                "finished": finished, "workers": max(1, self.num_workers), "world": self._world(),
                "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict) if state_dict and state_dict.get("version") == 1 else None

    def val_dataloader(self):
        if self.val_set is None:
            self.setup("validate")
        if self.val_set is None:
            return []
        return self._loader(self.val_set, lambda: 0)

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.current_epoch)
        return int(self.train_set._epoch.value) if self.train_set is not None else 0

    def set_epoch(self, epoch: int) -> None:
        """For use without a Trainer: the epoch the next train pass shuffles for."""
        if self.train_set is None:
            self.setup("fit")
        self.train_set.set_epoch(epoch)
