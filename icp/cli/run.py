"""``icp run CONFIG [key=value ...] [--only STAGE ...] [--dry-run]``: the main job."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from icp.cli.fit import add_config_arguments
    from icp.jobs.run import STAGES

    p = sub.add_parser("run", help="the main job: data -> embedder -> stitching -> adaptation -> evaluation -> report",
                       description="Run every stage of a pipeline config (experiments/quickstart.yaml). "
                                   "Stages already done with the same settings are skipped.")
    add_config_arguments(p, "experiments/quickstart.yaml", "device=cuda data.identities=200")
    p.add_argument("--only", nargs="+", choices=STAGES, help="re-run just these stages (even if up to date)")
    p.add_argument("--until", choices=STAGES, help="stop after this stage (a later run continues from there)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from icp.core import config as cfglib
    from icp.jobs import run as mainjob
    from icp.cli.fit import print_dry_run

    cfg = cfglib.load(args.config, args.overrides)
    mainjob.check(cfg)
    if args.dry_run:
        return print_dry_run(cfg)
    run_dir = mainjob.run(cfg, only=args.only, until=args.until)
    report = run_dir / "report.html"
    print(f"icp: run directory {run_dir}" + (f"; report {report}" if report.is_file() else ""))
    return 0
