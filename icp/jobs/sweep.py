"""``icp fit CONFIG -m key=a,b ...`` on this machine: every point checked, then trained one after another.

Each point is an ordinary ``icp fit`` into its own run directory, so a sweep cut short resumes by
running the same command again (finished points say "already done"). ``icp slurm submit -m`` runs
the same points as one job array (icp.cluster.slurm.submit_array).
"""

from __future__ import annotations

from pathlib import Path

from icp.core import sweep as sweeplib
from icp.jobs.fit import fit
from icp.jobs.preflight import preflight


def run_local(config: str, overrides: list[str]) -> Path:
    """Train every point of the grid; returns the sweep manifest's path."""
    plan = sweeplib.plan(config, overrides)
    for cfg in plan.configs:  # every point's data and targets before the first one trains
        preflight(cfg)
    path = sweeplib.write_manifest(plan)
    n = len(plan.configs)
    print(f"icp: sweep {plan.sweep.sweep_id}: {n} point(s), manifest {path}")
    for i, cfg in enumerate(plan.configs):
        print(f"icp: sweep point {i + 1}/{n}: {sweeplib.describe(plan, i) or '(no axis)'}")
        fit(cfg)
    return path
