"""The fixed held-out evaluation set, read from a shard folder (eval/protocol.md).

Items are built exactly like validation pairs (``PairMaker(fixed=True)``: the profile/target
views and the target's patch mask depend only on (seed, identity, j)), so every evaluation,
rank layout and worker count sees the same pairs. Under DDP, sample i goes to rank i % world
(``ShardStream(split_samples=True)``), so each pair is evaluated exactly once.
"""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import DataLoader

from icp.data import keys as K

from icp.data.datamodule import PairMaker
from icp.data.shards.read import ShardStream


def heldout_loader(shards: str, resolution: int | None = None, mask_ratio: float = 0.8, patch_size: int = 8,
                   pairs_per_identity: int = 1, seed: int = 0, batch_size: int = 8) -> DataLoader:
    maker = PairMaker(resolution, mask_ratio, patch_size, pairs_per_identity, seed=seed, fixed=True)
    stream = ShardStream(shards, maker, seed=seed, shardshuffle=False, shuffle_buffer=0, resampled=False,
                         split_samples=True)
    return DataLoader(stream, batch_size=batch_size, num_workers=0)


def take(loader, max_items: int | None) -> Iterator[dict]:
    """Batches of ``loader`` until ``max_items`` items were yielded (the last batch is cut)."""
    seen = 0
    for batch in loader:
        if max_items is not None and seen >= max_items:
            return
        n = len(next(v for v in batch.values() if hasattr(v, "__len__")))
        if max_items is not None and seen + n > max_items:
            keep = max_items - seen
            batch = {k: v[:keep] for k, v in batch.items()}
            n = keep
        seen += n
        yield batch


def interleaved(batches, max_items: int | None, batch_size: int) -> Iterator[dict]:
    """The first ``max_items`` pairs of ``batches``, re-batched so consecutive pairs belong to different
    identities (round robin). A held-out stream yields several pairs of one head in a row; without this
    a batch can hold a single identity and has no other-identity baseline."""
    import torch

    items: list[dict] = []
    for batch in take(batches, max_items):
        n = len(next(v for v in batch.values() if hasattr(v, "__len__")))
        items += [{k: v[i] for k, v in batch.items()} for i in range(n)]
    by_id: dict[int, list[dict]] = {}
    for item in items:
        by_id.setdefault(int(item[K.IDENTITY]) if K.IDENTITY in item else -1, []).append(item)
    order, queues = [], list(by_id.values())
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        yield {k: torch.stack([c[k] for c in chunk]) if isinstance(chunk[0][k], torch.Tensor) else [c[k] for c in chunk]
               for k in chunk[0]}
