"""``icp fit CONFIG [key=value ...] [--dry-run] [-m]``."""

from __future__ import annotations

import argparse
import pickle

from icp.core.errors import WeightsError


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
    add_multirun_argument(p)
    p.set_defaults(func=run)


def add_multirun_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--multirun", action="store_true",
                   help="sweep: key=a,b overrides are axes, every combination is one run "
                        "(e.g. -m model.optimizer.lr=1e-4,3e-4 seed=0,1); manifest in <run.root>/<experiment>/sweeps/")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:200]


def _resume_error(err: RuntimeError) -> WeightsError:
    """A resume whose checkpoint does not fit the model (an override changed a shape): one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                  lines[0] if lines else "")
    return WeightsError(f"the run's checkpoint does not fit the model of this config ({detail[:200]}); a changed "
                        "shape needs a new run (another run.name) or run.restart=true")


def run(args: argparse.Namespace) -> int:
    from icp.core import config as cfglib

    if args.multirun:
        return _sweep(args)
    cfg = cfglib.load(args.config, args.overrides)
    cfglib.check_values(cfg)  # NaN/inf and out-of-range counts: one line, before anything is built
    from icp.jobs.preflight import preflight

    # Data paths and every _target_: fit checks them too, but here a wrong path fails before
    # Lightning is even imported (seconds), and --dry-run checks what a run would.
    preflight(cfg)
    if args.dry_run:
        return print_dry_run(cfg)
    from icp.jobs.fit import fit

    try:
        run_dir = fit(cfg)
    except RuntimeError as err:
        if "loading state_dict" not in str(err):
            raise
        raise _resume_error(err) from None
    except pickle.UnpicklingError as err:
        # A checkpoint holding pickled objects (weights_only refused it): nothing ran; say which.
        raise WeightsError(f"the run's checkpoint needs full unpickling and was refused (it could run code): "
                           f"{_first_line(err)}; restore a checkpoint written by icp or pass run.restart=true") from None
    print(f"icp: run directory {run_dir}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from icp.core import sweep as sweeplib

    if args.dry_run:
        from icp.jobs.preflight import preflight

        plan = sweeplib.plan(args.config, args.overrides)
        for cfg in plan.configs:
            preflight(cfg)
        for i, run_dir in enumerate(plan.run_dirs):
            print(f"{sweeplib.describe(plan, i) or '(no axis)'}\t{run_dir}")
        print(f"# sweep manifest: {plan.directory / sweeplib.MANIFEST}")
        return 0
    from icp.jobs.sweep import run_local

    print(f"icp: sweep manifest {run_local(args.config, args.overrides)}")
    return 0
