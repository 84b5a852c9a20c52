"""Reproduce IC-Portrait's claims at small scale (issue 10): one command, one report.

    python eval/paper_claims.py                                   # GPU size, eval/paper_claims.yaml
    python eval/paper_claims.py --config tests/configs/paper_claims_ci.yaml root=/tmp/pc
    python eval/paper_claims.py --jobs 4 claims.warping.pairs_per_bucket=64

Phases: synthetic shards -> identity embedder + pretrained base (``experiments/base_pretrain.yaml``)
-> Lighting-Aware Stitching at each mask ratio -> View-Consistent Adaptation (Matching Net from the
base / from random weights / without the warp) -> held-out evaluations -> ``<report>.md`` / ``.json``
and PNGs in a folder beside it. Every fit is an ordinary ``icp fit`` run under ``<root>/fits``
(cached: a re-run skips finished fits and evaluations), independent ones run as parallel
sub-processes (``--jobs``; default 7 on CUDA, 1 on CPU), and the report is rewritten after every
job, so a run that is cut short still leaves its tables. Device: ``device=auto|cpu|cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from icp.jobs.claims import plan as planlib  # noqa: E402
from icp.jobs import runner  # noqa: E402

from icp.core import config as cfglib  # noqa: E402
from icp.data.shards.format import MANIFEST  # noqa: E402
from icp.core.errors import DataError, IcpError  # noqa: E402
from icp.core.paths import EVAL  # noqa: E402
from icp.jobs.runner import resolve_device, shards_dirs  # noqa: E402

DEFAULT_CONFIG = EVAL / "paper_claims.yaml"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="dotlist overrides of the config, e.g. claims.masking.pairs=32")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="claims config (default: eval/paper_claims.yaml)")
    p.add_argument("--jobs", type=int, default=None, help="parallel sub-processes (default: config `jobs`, "
                                                          "else 7 on CUDA and 1 on CPU; 1 runs all in this process)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the report from what <root> holds (fits, evaluations, timeline.json); run nothing")
    p.add_argument("--run-job", default=None, help=argparse.SUPPRESS)  # internal: one job in a sub-process
    return p.parse_args(argv)


def execute(cfg, job: planlib.Job, device: str) -> None:
    """Run one job in this process."""
    if job.kind == "fit":
        from icp.jobs.fit import fit

        fit(job.cfg)
        if not runner.is_done(job):
            raise RuntimeError(f"fit {job.name} ended without reaching trainer.max_steps ({job.run_dir})")
        return
    from icp.jobs.claims import measure

    out_dir = Path(cfg.root) / "evals"
    out_dir.mkdir(parents=True, exist_ok=True)
    runner.write_result(job, measure.CLAIMS[job.spec["claim"]](cfg, job.spec, out_dir, job.name, device))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        cfg = cfglib.load(args.config, args.overrides)
        device = resolve_device(cfg)
        jobs = planlib.build(cfg)
        if args.run_job:
            execute(cfg, jobs[args.run_job], device)
            return 0
        if args.report_only:
            return report_only(cfg, args, jobs, device)
        return coordinate(cfg, args, jobs, device)
    except IcpError as err:
        print(f"paper_claims: error: {err}", file=sys.stderr)
        return 2


def _config_name(path: str, overrides: list[str]) -> str:
    """The config file (relative where it is inside the checkout) and the overrides that shaped the results."""
    rel = os.path.relpath(path)
    shown = [o for o in overrides if not o.startswith(("report=", "root="))]
    return " ".join([path if rel.startswith("..") else rel, *shown])


def report_only(cfg, args, jobs: dict[str, planlib.Job], device: str) -> int:
    """The report of a root fetched from elsewhere (a cluster, a GPU machine), without running a job."""
    from icp.jobs.claims import report

    root = Path(cfg.root)
    if not (root / "timeline.json").is_file():
        raise DataError(f"{root / 'timeline.json'} not found: --report-only needs a root that eval/paper_claims.py "
                       "ran in (set root=...)")
    timeline = runner.Timeline(root / "timeline.json", record=False)
    status = {name: "cached" if runner.has_result(job) else "missing" for name, job in jobs.items()}
    final = all(s == "cached" for s in status.values())
    path = report.write(cfg, jobs, timeline, status, device, final, _config_name(args.config, args.overrides))
    missing = sorted(n for n, s in status.items() if s != "cached")
    print(f"paper_claims: report {path}" + (f" (PARTIAL: {', '.join(missing)} missing)" if missing else ""))
    return 0 if final else 1


def coordinate(cfg, args, jobs: dict[str, planlib.Job], device: str) -> int:
    from icp.jobs.claims import report

    parallel = args.jobs or cfg.get("jobs") or (7 if device == "cuda" else 1)
    timeline = runner.Timeline(Path(cfg.root) / "timeline.json")  # kept across invocations
    print(f"paper_claims: {len(jobs)} jobs on {device}, {parallel} at a time, runs under {cfg.root}", flush=True)
    timeline.start("data")
    rendered = all((d / MANIFEST).is_file() for d in shards_dirs(cfg))
    runner.render_data(cfg)  # shards: skipped per shard when already rendered (the manifest checks the config)
    timeline.end("data", "cached" if rendered else "done")
    status: dict[str, str] = {"data": timeline.spans["data"]["status"]}

    config_name = _config_name(args.config, args.overrides)

    def write(final: bool = False) -> Path:
        return report.write(cfg, jobs, timeline, status, device, final, config_name)

    threads = max(1, (os.cpu_count() or 1) // parallel)
    command = [sys.executable, "-m", "icp.jobs.claims", "--config", str(args.config), *args.overrides]
    found = runner.run(
        jobs, execute=lambda j: execute(cfg, j, device), prefix="paper_claims",
        command=lambda j: [*command, "--run-job", j.name], parallel=parallel,
        log_dir=Path(cfg.root) / "logs", timeline=timeline, on_change=write,
        env={"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    status.update(found)
    timeline.finish()
    path = write(final=True)
    print("paper_claims: phase timings (s since start):")
    for name, span in timeline.spans.items():
        print(f"  {name:24s} {span.get('status', ''):8s} start {span['start']:7.1f}  took {span.get('seconds', 0):7.1f}")
    print(f"paper_claims: total {time.time() - timeline.t0:.0f} s; report {path}")
    return 0 if all(s in ("done", "cached") for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
