"""Intervals that respect the data: pairs of one identity are not independent samples.

Every mean icp reports on held-out pairs comes with a 95 % interval from a bootstrap that
resamples *identities* (all of an identity's pairs go in or out together), and a comparison with
fewer than ``MIN_VALID`` valid samples is shown but never called a win or a loss.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

MIN_VALID = 20
N_BOOT = 2000


def _finite(values: Sequence[float], ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    i = np.asarray(ids)
    keep = np.isfinite(v)
    return v[keep], i[keep]


def bootstrap_mean(values: Sequence[float], ids: Sequence[int], n_boot: int = N_BOOT, seed: int = 0,
                   level: float = 0.95) -> dict:
    """Mean of the finite ``values`` with a percentile interval from resampling identities.

    Returns {mean, lo, hi, n (valid samples), identities}; NaN interval for fewer than two identities.
    """
    v, i = _finite(values, ids)
    if v.size == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "identities": 0}
    groups = np.unique(i)
    out = {"mean": float(v.mean()), "n": int(v.size), "identities": int(groups.size)}
    if groups.size < 2:
        return {**out, "lo": math.nan, "hi": math.nan}
    sums = np.array([v[i == g].sum() for g in groups])
    counts = np.array([(i == g).sum() for g in groups])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, groups.size, size=(n_boot, groups.size))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    a = (1 - level) / 2
    return {**out, "lo": float(np.quantile(means, a)), "hi": float(np.quantile(means, 1 - a))}


def compare(method: Sequence[float], baseline: Sequence[float], ids: Sequence[int], higher_is_better: bool = True,
            seed: int = 0) -> dict:
    """Paired method - baseline differences (same pair, same noise) with an identity bootstrap.

    ``verdict``: "better" / "worse" when the 95 % interval of the difference excludes 0 and at least
    MIN_VALID pairs are valid, "no difference" when it includes 0, "too few" otherwise.
    """
    m, b = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    diff = m - b
    stats = bootstrap_mean(diff, ids, seed=seed)
    valid = np.isfinite(diff)
    stats["win_rate"] = float(((diff[valid] > 0) == higher_is_better).mean()) if valid.any() else math.nan
    if stats["n"] < MIN_VALID or math.isnan(stats["lo"]):
        stats["verdict"] = "too few"
    elif stats["lo"] > 0 or stats["hi"] < 0:
        stats["verdict"] = "better" if (stats["lo"] > 0) == higher_is_better else "worse"
    else:
        stats["verdict"] = "no difference"
    return stats


def fmt_interval(stats: dict, digits: int = 3) -> str:
    """'0.412 [0.380, 0.441] (n=64, 16 ids)' -- the form every report prints."""
    if not stats or stats.get("n", 0) == 0:
        return "n/a (no valid sample)"
    f = f"{{:.{digits}f}}"
    mean = f.format(stats["mean"])
    ci = "" if math.isnan(stats.get("lo", math.nan)) else f" [{f.format(stats['lo'])}, {f.format(stats['hi'])}]"
    return f"{mean}{ci} (n={stats['n']}, {stats['identities']} ids)"
