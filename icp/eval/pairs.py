"""Held-out profile/target pairs rendered directly (identities the fits never saw).

The held-out identities are the generator's index range [identities, identities + heldout), the
same as the held-out shards; views 0..V-1 equal the shards' views (``render_group`` is seeded by
(seed, identity, view)), and more views than the shards hold are new views of the same heads.
Rendering here lets the warping claim pick pairs by yaw difference (the shards' few views per
identity give too few large-yaw pairs) and lets every claim see the same pairs.

Pairs are built exactly like training/validation pairs (``PairMaker``: patch mask, true flow,
foreground masks, poses), with the mask seeded by (seed, identity, profile view, target view).
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from icp.data.datamodule import PairMaker
from icp.render.renderer import render_group
from icp.data.shards.read import stable_seed


def render_heldout(first: int, count: int, views: int, resolution: int, seed: int) -> dict[int, dict]:
    return {i: render_group(i, views, resolution, seed) for i in range(first, first + count)}


def make_pair(group: dict, identity: int, p: int, t: int, mask_ratio: float, patch_size: int, seed: int) -> dict:
    maker = PairMaker(None, mask_ratio, patch_size, 1, seed=seed, fixed=True)
    g = torch.Generator().manual_seed(stable_seed(seed, identity, p, t, 7))
    item = maker._pair(group, p, t, torch.tensor(identity), g)  # the one pair recipe of the data module
    return {k: v for k, v in item.items() if isinstance(v, torch.Tensor)}


def yaw_difference(group: dict, p: int, t: int) -> float:
    return abs(float(group["pose"][p, 0] - group["pose"][t, 0]))


def interleave(pairs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Order (identity, p, t) so consecutive pairs belong to different identities (round robin)."""
    by_id: dict[int, list] = {}
    for pair in pairs:
        by_id.setdefault(pair[0], []).append(pair)
    out, queues = [], list(by_id.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def random_pairs(identities: list[int], views: int, per_identity: int, seed: int) -> list[tuple[int, int, int]]:
    """``per_identity`` distinct ordered view pairs (p != t) per identity, seeded, interleaved."""
    pairs = []
    for i in identities:
        g = torch.Generator().manual_seed(stable_seed(seed, i, 11))
        all_pairs = [(p, t) for p in range(views) for t in range(views) if p != t]
        for k in torch.randperm(len(all_pairs), generator=g)[:per_identity].tolist():
            pairs.append((i, *all_pairs[k]))
    return interleave(pairs)


def bucket_pairs(groups: dict[int, dict], edges: list[float], per_bucket: int, seed: int
                 ) -> dict[int, list[tuple[int, int, int]]]:
    """All ordered view pairs of the held-out identities, bucketed by |yaw(profile) - yaw(target)|
    into [edges[k], edges[k+1]), then up to ``per_bucket`` per bucket drawn round-robin over
    identities (so no head dominates a bucket)."""
    buckets: dict[int, dict[int, list]] = {k: {} for k in range(len(edges) - 1)}
    for i, group in groups.items():
        views = group["rgb"].shape[0]
        for p in range(views):
            for t in range(views):
                if p == t:
                    continue
                d = yaw_difference(group, p, t)
                for k in range(len(edges) - 1):
                    if edges[k] <= d < edges[k + 1]:
                        buckets[k].setdefault(i, []).append((i, p, t))
    chosen = {}
    for k, by_id in buckets.items():
        g = torch.Generator().manual_seed(stable_seed(seed, k, 13))
        shuffled = [[lst[j] for j in torch.randperm(len(lst), generator=g).tolist()] for _, lst in sorted(by_id.items())]
        chosen[k] = interleave([pair for lst in shuffled for pair in lst])[:per_bucket]
    return chosen


def batches(groups: dict[int, dict], pairs: list[tuple[int, int, int]], batch_size: int, mask_ratio: float,
            patch_size: int, seed: int):
    """Collated batches (the batch contract) of the given pairs, in order."""
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        items = [make_pair(groups[i], i, p, t, mask_ratio, patch_size, seed) for i, p, t in chunk]
        yield default_collate(items)
