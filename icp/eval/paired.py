"""The one paired evaluation: generate held-out pairs, score them beside their baselines.

Every caller -- ``icp run``'s evaluate stage, the claims study, the in-loop ``EvalCallback`` and
``icp eval`` -- goes through :func:`evaluate_pairs`, so a fix here fixes them all:

- the method generates each batch with noise seeded by (seed, the batch's first identity), so
  every evaluation, rank layout and worker count sees the same noise;
- every baseline (icp.eval.baselines) is generated for the *same* pairs with the *same* noise and
  scored by the same extractors against the TRUE profile and target, so method and baseline rows
  are paired (row k of every arm is pair k);
- ``other_models`` are further arms that run another sampler on the same batch and noise
  (e.g. adaptation without the warp);
- rows are gathered from all ranks; scalars reduce across ranks (every rank must call this);
- each metric's mean carries an identity-bootstrap interval, each method-vs-baseline difference
  a paired interval and a verdict that needs ``stats.MIN_VALID`` valid pairs.

Evaluation reaches a task ONLY through ``sample(batch, num_steps, guidance_scale, generator)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device

from icp.data import keys as K
from icp.eval import stats
from icp.eval.baselines import LABELS, Baseline
from icp.eval.evaluator import LOWER_IS_BETTER, Evaluator, Extractors

METHOD = "method"
Sample = Callable[..., torch.Tensor]  # task.sample(batch, num_steps=, guidance_scale=, generator=)


@dataclass
class PairedResult:
    scalars: dict[str, dict[str, float]] = field(default_factory=dict)   # arm -> metric -> mean (all ranks)
    rows: dict[str, list[dict]] = field(default_factory=dict)            # arm -> per-pair rows, aligned
    intervals: dict[str, dict[str, dict]] = field(default_factory=dict)  # arm -> metric -> bootstrap_mean
    comparisons: dict[str, dict[str, dict]] = field(default_factory=dict)  # baseline -> metric -> compare
    empty: dict[str, list[str]] = field(default_factory=dict)            # arm -> metrics without a valid sample
    grid_columns: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # first batch, this rank
    grid_identities: list[int] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return len(self.rows.get(METHOD, []))


def noise_seed(seed: int, batch: dict) -> int:
    first = int(batch[K.IDENTITY][0]) if K.IDENTITY in batch else 0
    return seed * 1_000_003 + first


def gather_rows(rows: list[dict]) -> list[dict]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, rows)
        return [r for part in parts for r in part]
    return rows


def _nan_rows(batch: dict, names: list[str]) -> list[dict]:
    ids = batch.get(K.IDENTITY)
    n = len(batch[K.PROFILE])
    return [{"identity": int(ids[i]) if ids is not None else -1, **{k: math.nan for k in names}} for i in range(n)]


@torch.no_grad()
def evaluate_pairs(sample: Sample, batches: Iterable[dict], extractors: Extractors, device: torch.device | str,
                   baselines: dict[str, Baseline] | None = None, other_models: dict[str, Sample] | None = None,
                   num_steps: int = 20, guidance_scale: float | None = None, seed: int = 0,
                   grid_samples: int = 0, kid_subset_size: int = 100,
                   evaluators: dict[str, Evaluator] | None = None, progress=None) -> PairedResult:
    """Generate and score ``batches`` (this rank's slice) for the method and every baseline."""
    device = torch.device(device)
    baselines, other_models = dict(baselines or {}), dict(other_models or {})
    arms = [METHOD, *baselines, *other_models]
    evaluators = evaluators if evaluators is not None else {}
    for arm in arms:
        if arm not in evaluators:
            evaluators[arm] = Evaluator(extractors, kid_subset_size=kid_subset_size)
        evaluators[arm].to(device).reset()
    rows: dict[str, list[dict]] = {arm: [] for arm in arms}
    result = PairedResult()
    for batch in batches:
        batch = move_data_to_device(batch, device)
        noise = noise_seed(seed, batch)

        def generate(b: dict, fn: Sample = sample) -> torch.Tensor:
            g = torch.Generator(device=device).manual_seed(noise)
            return fn(b, num_steps=num_steps, guidance_scale=guidance_scale, generator=g)

        images = {METHOD: generate(batch)}
        for name, baseline in baselines.items():
            images[name] = baseline(batch, generate)
        for name, fn in other_models.items():
            images[name] = generate(batch, fn)
        for arm in arms:
            if images[arm] is None:
                rows[arm] += _nan_rows(batch, evaluators[METHOD].averages.names)
            else:
                rows[arm] += evaluators[arm].update(images[arm], batch)
        if not result.grid_columns and grid_samples > 0:
            n = min(grid_samples, len(batch[K.PROFILE]))
            cols = [("profile", batch[K.PROFILE][:n])]
            if K.TARGET_MASKED in batch:
                cols.append(("masked target", batch[K.TARGET_MASKED][:n]))
            cols += [(LABELS.get(a, a), images[a][:n]) for a in arms if images[a] is not None and a != "truth"]
            if K.TARGET in batch:
                cols.append(("true render", batch[K.TARGET][:n]))
            result.grid_columns = [(label, t.detach().float().cpu()) for label, t in cols]
            result.grid_identities = batch[K.IDENTITY][:n].tolist() if K.IDENTITY in batch else []
        if progress is not None:
            progress.update(1)
    for arm in arms:
        result.scalars[arm] = evaluators[arm].compute()
        result.empty[arm] = list(evaluators[arm].empty)
        result.rows[arm] = gather_rows(rows[arm])
    _summarise(result, seed)
    return result


def _summarise(result: PairedResult, seed: int) -> None:
    method = result.rows[METHOD]
    ids = [r["identity"] for r in method]
    names = sorted({k for r in method for k in r if k != "identity"})
    for arm, rows in result.rows.items():
        result.intervals[arm] = {k: stats.bootstrap_mean([r.get(k, math.nan) for r in rows], ids, seed=seed)
                                 for k in names}
        if arm == METHOD:
            continue
        result.comparisons[arm] = {
            k: stats.compare([r.get(k, math.nan) for r in method], [r.get(k, math.nan) for r in rows], ids,
                             higher_is_better=k not in LOWER_IS_BETTER, seed=seed)
            for k in names}
