"""``icp fit CONFIG [key=value ...] [--dry-run]``."""

from __future__ import annotations

import argparse


def add_config_arguments(p: argparse.ArgumentParser, example: str, override_example: str) -> None:
    """CONFIG, dotlist overrides and --dry-run: the arguments every config-driven verb takes."""
    p.add_argument("config", help=f"experiment YAML, e.g. {example}")
    p.add_argument("overrides", nargs="*", help=f"dotlist overrides, e.g. {override_example} (+key=v adds a key)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the run directory; run nothing")


def print_dry_run(cfg) -> int:
    from icp.core import config as cfglib
    from icp.core import rundir

    print(cfglib.to_yaml(cfg), end="")
    print(f"# run directory: {rundir.run_dir_of(cfg)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="train an experiment config (resumes its run directory)",
                       description="Train an experiment. Running the same command again resumes "
                                   "from the run's last checkpoint.")
    add_config_arguments(p, "experiments/stitching/tiny.yaml", "trainer.max_steps=10")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from icp.core import config as cfglib

    cfg = cfglib.load(args.config, args.overrides)
    cfglib.check_values(cfg)  # NaN/inf and out-of-range counts: one line, before anything is built
    if args.dry_run:
        return print_dry_run(cfg)
    from icp.jobs.fit import fit

    run_dir = fit(cfg)
    print(f"icp: run directory {run_dir}")
    return 0
