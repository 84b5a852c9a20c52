"""``icp run CONFIG [key=value ...] [--only STAGE ...] [--dry-run]``: the main job."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from icp.mainjob import STAGES

    p = sub.add_parser("run", help="the main job: data -> embedder -> stitching -> adaptation -> evaluation -> report",
                       description="Run every stage of a pipeline config (experiments/quickstart.yaml). "
                                   "Stages already done with the same settings are skipped.")
    p.add_argument("config", help="pipeline YAML, e.g. experiments/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. device=cuda data.identities=200")
    p.add_argument("--only", nargs="+", choices=STAGES, help="re-run just these stages (even if up to date)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config; run nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from icp import config as cfglib
    from icp import mainjob, rundir

    cfg = cfglib.load(args.config, args.overrides)
    mainjob.check(cfg)
    if args.dry_run:
        print(cfglib.to_yaml(cfg), end="")
        print(f"# run directory: {rundir.run_dir_of(cfg)}")
        return 0
    run_dir = mainjob.run(cfg, only=args.only)
    report = run_dir / "report.html"
    print(f"icp: run directory {run_dir}" + (f"; report {report}" if report.is_file() else ""))
    return 0
