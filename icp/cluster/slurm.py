"""SLURM: render and submit ``icp fit`` jobs; survive preemption; keep the global batch fixed.

Three pieces, all about running one experiment on many processes that may be stopped at any time:

* ``render_script`` / ``submit``: an sbatch script from ``slurm/fit.sbatch.j2`` that runs the
  resolved config saved in the run directory under ``srun`` (one task per GPU), with
  ``--signal=USR1@90`` and ``--requeue``. Lightning's ``SLURMEnvironment`` reads ranks, nodes and
  the master address from the SLURM variables, so ``trainer.num_nodes``/``devices`` only have to
  match ``--nodes``/``--ntasks-per-node``, which ``prepare_config`` makes sure of.
* ``icp.cluster.preemption.PreemptionCheckpoint`` (its own module): the one SIGUSR1 handler.
* ``accumulation_steps`` + ``GlobalBatchSize``: the optimizer sees the same global batch whatever
  the number of GPUs (``global_batch_size`` = per-device batch x devices x nodes x accumulation).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from icp.core.errors import ConfigError, IcpError
from icp.core.paths import SLURM_TEMPLATES
from icp.core.secrets import leaks

log = logging.getLogger(__name__)

TEMPLATE_DIR = SLURM_TEMPLATES
SCRIPT_NAME = "job.sbatch"


# ------------------------------------------------------------------------- global batch size


def accumulation_steps(global_batch_size: int, per_device_batch_size: int, devices: int, num_nodes: int = 1) -> int:
    """Gradient-accumulation steps that make ``global_batch_size`` on ``devices x num_nodes``."""
    per_step = int(per_device_batch_size) * int(devices) * int(num_nodes)
    if per_step <= 0 or global_batch_size <= 0:
        raise ConfigError(f"global_batch_size={global_batch_size} needs a positive per-device batch size "
                          f"and device count (got batch {per_device_batch_size} x {devices} devices x {num_nodes} nodes)")
    if global_batch_size % per_step:
        raise ConfigError(
            f"global_batch_size={global_batch_size} is not a multiple of per-device batch {per_device_batch_size} "
            f"x {devices} devices x {num_nodes} nodes = {per_step}; change data.batch_size or global_batch_size")
    return global_batch_size // per_step


class GlobalBatchSize(L.Callback):
    """Sets ``trainer.accumulate_grad_batches`` from the world size at ``fit`` start.

    Config: ``callbacks.global_batch: {_target_: icp.cluster.slurm.GlobalBatchSize, global_batch_size: 64,
    per_device_batch_size: ${data.batch_size}}``. Runs in ``setup``, before any batch is drawn.
    """

    def __init__(self, global_batch_size: int, per_device_batch_size: int):
        self.global_batch_size = int(global_batch_size)
        self.per_device_batch_size = int(per_device_batch_size)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        steps = accumulation_steps(self.global_batch_size, self.per_device_batch_size,
                                   trainer.num_devices, trainer.num_nodes)
        if trainer.accumulate_grad_batches not in (1, steps):
            raise ConfigError(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} conflicts with "
                              f"global_batch_size={self.global_batch_size}; remove one of them")
        trainer.accumulate_grad_batches = steps
        if trainer.is_global_zero:
            log.info("global batch %d = %d per device x %d devices x %d nodes x %d accumulation",
                     self.global_batch_size, self.per_device_batch_size, trainer.num_devices,
                     trainer.num_nodes, steps)


# ------------------------------------------------------------------------ rendering, submit


@dataclass
class JobSpec:
    """What ``icp slurm submit`` asks Slurm for (the flags of the verb, one to one)."""

    nodes: int = 1
    gpus_per_node: int = 1
    cpu: bool = False               # G processes per node on CPU, no GPU request (tests, debugging)
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    env_setup: str = ""             # e.g. "source .venv/bin/activate"; sbatch also exports the caller's env
    job_name: str | None = None
    signal_seconds: int = 90
    icp_command: str | None = None  # None: the `icp` of the submitting environment, by absolute path
    extra_sbatch: list[str] = field(default_factory=list)

    @property
    def cpu_job(self) -> bool:
        """``--cpu``, or ``--gpus-per-node 0``: a CPU partition's job (no GPU request)."""
        return self.cpu or self.gpus_per_node == 0

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    def command(self) -> str:
        return self.icp_command or default_icp_command()

    def check(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ConfigError(f"--nodes ({self.nodes}) must be >= 1 and --gpus-per-node ({self.gpus_per_node}) >= 0 "
                              "(0: a CPU job)")
        if self.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", self.time):
            raise ConfigError(f"--time {self.time!r} is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)")
        # Each value lands on one line of the script: no value may end that line and start another.
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--mem", self.mem),
                            ("--job-name", self.job_name), ("--time", self.time), ("icp command", self.icp_command),
                            *(("--sbatch", x) for x in self.extra_sbatch)):
            if value is not None and (_LINE_BREAK.search(str(value)) or not str(value).strip()):
                raise ConfigError(f"{flag} {value!r}: a value of an sbatch option must be one non-empty line")


def default_icp_command() -> str:
    """The ``icp`` of the environment running this (``<venv>/bin/icp``), by absolute path: a job
    started without that environment on PATH would otherwise run another ``icp``, or try the
    checkout's ``icp/`` folder ("execve(): icp: Permission denied"). Without a console script
    beside the interpreter: ``<python> -m icp.cli``."""
    script = Path(sys.executable).with_name("icp")
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script.absolute()))
    return shlex.join([str(Path(sys.executable).absolute()), "-m", "icp.cli"])


def prepare_config(cfg: DictConfig, spec: JobSpec) -> DictConfig:
    """Make the trainer match the allocation; add the preemption callback if the config lacks it.

    ``trainer.num_nodes``/``devices`` must equal ``--nodes``/``--ntasks-per-node`` or Lightning's
    SLURM environment refuses to start. DDP is the default strategy; a config may choose another
    (e.g. ``trainer.strategy=fsdp``).
    """
    spec.check()
    from icp.core import config as cfglib

    cfg = cfglib.copy(cfg)  # keeps the command-line approvals (security.*) of the loaded config
    OmegaConf.set_struct(cfg, False)
    cfg.trainer.num_nodes = spec.nodes
    cfg.trainer.devices = spec.tasks_per_node
    cfg.trainer.accelerator = "cpu" if spec.cpu_job else "gpu"
    if OmegaConf.select(cfg, "trainer.strategy", default=None) in (None, "auto"):
        cfg.trainer.strategy = "ddp"
    callbacks = OmegaConf.select(cfg, "callbacks", default=None) or {}
    targets = {str(OmegaConf.select(node, "_target_", default="")) for node in callbacks.values() if node}
    if "icp.cluster.preemption.PreemptionCheckpoint" not in targets:
        if not callbacks:
            cfg.callbacks = {}
        cfg.callbacks.preemption = {"_target_": "icp.cluster.preemption.PreemptionCheckpoint"}
    return cfg


# Control characters and the line separators some shells or editors honour.
_LINE_BREAK = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
# Characters a run directory may have in the script: it stands unquoted in #SBATCH lines.
_SAFE_PATH = re.compile(r"[\w./+,:=@-]+")


def _check_path(run_dir: Path) -> None:
    if not _SAFE_PATH.fullmatch(run_dir.as_posix()):
        raise ConfigError(f"run directory {run_dir.as_posix()!r} cannot stand in an sbatch script (spaces, quotes or "
                          "control characters); choose run.root, experiment and run.name of letters, digits and _ . - /")


def _array_lines(run_dirs: list[Path]) -> tuple[str, str]:
    """A job array over ``run_dirs``: the #SBATCH option, and the shell lines that pick this task's
    run directory by ``SLURM_ARRAY_TASK_ID`` (each task requeues on its own, as one job does)."""
    for d in run_dirs:
        _check_path(d)
    listed = " ".join(shlex.quote(d.as_posix()) for d in run_dirs)
    select = (f"RUN_DIRS=({listed})\n"
              'RUN_DIR="${RUN_DIRS[${SLURM_ARRAY_TASK_ID:?not an array task}]}"\n'
              'echo "icp: array task ${SLURM_ARRAY_TASK_ID} (job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}) runs ${RUN_DIR}"')
    return f"--array=0-{len(run_dirs) - 1}", select


def render_script(cfg: DictConfig, run_dir: Path, spec: JobSpec, template: Path | None = None,
                  array_run_dirs: list[Path] | None = None) -> str:
    """The sbatch script of one run; with ``array_run_dirs`` a job array, task i training the
    saved config of ``array_run_dirs[i]`` and ``run_dir`` the folder holding the array's logs."""
    import jinja2

    spec.check()
    _check_path(run_dir)
    extra, env_setup, config = list(spec.extra_sbatch), spec.env_setup, shlex.quote((run_dir / "config.yaml").as_posix())
    if array_run_dirs:
        option, select = _array_lines(array_run_dirs)
        extra, env_setup, config = [option, *extra], f"{env_setup}\n{select}".lstrip("\n"), '"${RUN_DIR}/config.yaml"'

    template = Path(template) if template else TEMPLATE_DIR / "fit.sbatch.j2"
    if not template.is_file():
        raise ConfigError(f"sbatch template {template} not found; pass --template PATH or run from a checkout of icp")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    name = spec.job_name or f"icp-{OmegaConf.select(cfg, 'experiment', default='run')}-{run_dir.name}"
    script = env.from_string(template.read_text()).render(
        run_dir=run_dir.as_posix(), job_name=re.sub(r"[^\w.-]", "_", name), nodes=spec.nodes,
        tasks_per_node=spec.tasks_per_node, gpus_per_node=None if spec.cpu_job else spec.gpus_per_node,
        cpus_per_task=spec.cpus_per_task, mem=spec.mem, time=spec.time, partition=spec.partition,
        account=spec.account, signal_seconds=spec.signal_seconds, extra_sbatch=extra,
        env_setup=env_setup, icp_command=spec.command(), config=config,
    )
    leaked = leaks(script)
    if leaked:
        # Redacting would silently break the job; sbatch passes the submitting shell's environment on.
        raise ConfigError(f"the sbatch script would contain the value of {', '.join(leaked)} (from --env-setup, "
                          "--sbatch or the job name); export it in your shell instead, sbatch passes it on")
    return script


def parse_job_id(sbatch_stdout: str) -> str:
    """The job id from ``sbatch --parsable`` (``123`` or ``123;cluster``) or plain ``sbatch``."""
    match = re.search(r"^\s*(\d+)(;\S+)?\s*$", sbatch_stdout, re.M) or re.search(r"Submitted batch job (\d+)", sbatch_stdout)
    if not match:
        raise IcpError(f"could not read a job id from sbatch's answer: {sbatch_stdout.strip()[:200]!r}")
    return match.group(1)


def submit(cfg: DictConfig, spec: JobSpec, dry_run: bool = False, template: Path | None = None,
           sbatch: str = "sbatch") -> tuple[Path, str, str | None]:
    """Prepare the run directory, write its sbatch script and submit it.

    Returns (run directory, script text, job id); with ``dry_run`` nothing is written or
    submitted and the job id is None.
    """
    from icp.core import rundir

    cfg = prepare_config(cfg, spec)
    run_dir = rundir.run_dir_of(cfg)
    script = render_script(cfg, run_dir, spec, template)
    if dry_run:
        return run_dir, script, None
    _need(sbatch)
    run_dir = rundir.prepare(cfg)
    return run_dir, script, _sbatch(sbatch, run_dir, script)


def _need(sbatch: str) -> None:
    if shutil.which(sbatch) is None:
        raise IcpError(f"'{sbatch}' not found on PATH: submit from a Slurm login node, or use --dry-run to see the script")


def _sbatch(sbatch: str, folder: Path, script: str) -> str:
    """Write ``folder/job.sbatch``, submit it, note the job id in ``folder/logs/slurm_jobs.txt``."""
    path = folder / SCRIPT_NAME
    path.write_text(script)
    done = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no message"]
        raise IcpError(f"sbatch refused {path}: {reason[0]}")
    job_id = parse_job_id(done.stdout)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    with open(folder / "logs" / "slurm_jobs.txt", "a") as fh:
        fh.write(job_id + "\n")
    return job_id


def submit_array(config: str, overrides: list[str], spec: JobSpec, dry_run: bool = False,
                 template: Path | None = None, sbatch: str = "sbatch", check=None) -> tuple[Path, str, str | None]:
    """A sweep (``icp slurm submit CONFIG -m key=a,b ...``) as one job array, one task per point.

    Every point's run directory is prepared (config.yaml) before submitting, so task i runs
    exactly the saved config of point i and a requeued task resumes its own run. ``check(cfg)``
    runs on each point before anything is written (the CLI passes the preflight). Returns (sweep folder, script, job id).
    """
    from icp.core import rundir
    from icp.core import sweep as sweeplib

    plan = sweeplib.plan(config, overrides, prepare=lambda cfg: prepare_config(cfg, spec))
    folder = plan.directory
    script = render_script(plan.configs[0], folder, spec, template, array_run_dirs=plan.run_dirs)
    for cfg in plan.configs if check is not None else ():
        check(cfg)
    if dry_run:
        return folder, script, None
    _need(sbatch)
    for cfg in plan.configs:
        rundir.prepare(cfg)
    sweeplib.write_manifest(plan)
    return folder, script, _sbatch(sbatch, folder, script)
