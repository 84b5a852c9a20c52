"""``icp fit CONFIG [key=value ...] [--dry-run]``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="train an experiment config (resumes its run directory)",
                       description="Train an experiment. Running the same command again resumes "
                                   "from the run's last checkpoint.")
    p.add_argument("config", help="experiment YAML, e.g. experiments/stitching/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. trainer.max_steps=10 (+key=v adds a key)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the run directory; train nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from icp import config as cfglib
    from icp import rundir

    cfg = cfglib.load(args.config, args.overrides)
    if args.dry_run:
        print(cfglib.to_yaml(cfg), end="")
        print(f"# run directory: {rundir.run_dir_of(cfg)}")
        return 0
    from icp.train import fit

    run_dir = fit(cfg)
    print(f"icp: run directory {run_dir}")
    return 0
