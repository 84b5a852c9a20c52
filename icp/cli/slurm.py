"""``icp slurm submit CONFIG [key=value ...] --nodes N --gpus-per-node G [...] [--dry-run] [-m]``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="run experiments on a SLURM cluster (submit, requeue on preemption)",
                       description="Run experiments on SLURM.")
    verbs = p.add_subparsers(dest="slurm_verb", metavar="ACTION", required=True)
    s = verbs.add_parser(
        "submit", help="render an sbatch script into the run directory and submit it",
        description="Resolve CONFIG, create its run directory (config.yaml, job.sbatch) and submit the job. "
                    "The job runs `icp fit` on the saved config under srun with one task per GPU; on "
                    "USR1 (90 s before the time limit) it checkpoints, requeues itself and resumes.")
    s.add_argument("config", help="experiment YAML, e.g. experiments/stitching/tiny.yaml")
    s.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. trainer.max_steps=1000")
    s.add_argument("--nodes", type=int, default=1, help="nodes (trainer.num_nodes) [1]")
    s.add_argument("--gpus-per-node", type=int, default=1, help="GPUs = tasks per node (trainer.devices); 0: a CPU job, one task per node [1]")
    s.add_argument("--cpu", action="store_true", help="run --gpus-per-node processes on CPU, request no GPUs")
    s.add_argument("--partition", help="SLURM partition")
    s.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00")
    s.add_argument("--account", help="SLURM account to charge")
    s.add_argument("--cpus-per-task", type=int, help="CPUs per task (data-loader workers + 1)")
    s.add_argument("--mem", help="memory per node, e.g. 200G")
    s.add_argument("--job-name", help="job name [icp-<experiment>-<run name>]")
    s.add_argument("--env-setup", default="",
                   help='shell line run before srun, e.g. "source .venv/bin/activate" '
                        "(sbatch also passes on the submitting shell's environment)")
    s.add_argument("--signal-seconds", type=int, default=90, help="send USR1 this long before the time limit [90]")
    s.add_argument("--sbatch", dest="extra_sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, repeatable, e.g. --sbatch=--constraint=h100")
    s.add_argument("--template", help="sbatch template (jinja2) [slurm/fit.sbatch.j2]")
    s.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    s.add_argument("-m", "--multirun", action="store_true",
                   help="sweep: key=a,b overrides are axes; ONE job array (--array=0-N), task i trains point i "
                        "in its own run directory (manifest and logs in <run.root>/<experiment>/sweeps/<id>/)")
    s.set_defaults(func=run_submit)


def run_submit(args: argparse.Namespace) -> int:
    from icp.core import config as cfglib
    from icp.cluster.slurm import JobSpec, submit, submit_array
    from icp.jobs.preflight import preflight

    spec = JobSpec(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpu=args.cpu, partition=args.partition,
        time=args.time, account=args.account, cpus_per_task=args.cpus_per_task, mem=args.mem,
        env_setup=args.env_setup, job_name=args.job_name, signal_seconds=args.signal_seconds,
        extra_sbatch=list(args.extra_sbatch),
    )
    if args.multirun:
        folder, script, job_id = submit_array(args.config, args.overrides, spec, dry_run=args.dry_run,
                                              template=args.template, check=preflight)
        if args.dry_run:
            print(script, end="")
            print(f"# sweep folder: {folder}")
        else:
            print(f"icp: submitted job array {job_id} for sweep {folder} (manifest: {folder}/sweep.json, "
                  f"logs: {folder}/logs/)")
        return 0
    cfg = cfglib.load(args.config, args.overrides)
    cfglib.check_values(cfg)
    preflight(cfg)  # data paths and every _target_, before the run directory is made
    run_dir, script, job_id = submit(cfg, spec, dry_run=args.dry_run, template=args.template)
    if args.dry_run:
        print(script, end="")
        print(f"# run directory: {run_dir}")
        return 0
    print(f"icp: submitted job {job_id} for run {run_dir} (log: {run_dir}/logs/slurm-{job_id}.out)")
    return 0
