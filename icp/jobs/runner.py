"""The stage runner shared by ``icp run`` and the claims study: jobs, their cache, their order.

A job is a named unit with dependencies: a *fit* (an ordinary ``icp fit`` of an experiment file
with overrides, run by ``icp.jobs.fit.fit`` into ``<root>/<experiment>/cfg-<hash>/``) or a *step*
(any function writing one JSON result that records its ``key``). Every path follows from the
config alone -- a fit's run directory is the hash of its resolved config, and a later job names an
earlier fit's directory before it exists -- so the whole plan is known up front, a sub-process can
rebuild it to run one job, and a re-run skips every job whose output is complete:

- one cache rule: a fit is done when it reached ``trainer.max_steps`` and wrote its checkpoint and
  the files its consumers read (``Job.needs``); a step is done when its result file holds the same
  key (what the step depends on, hashed). A changed setting changes a hash, so only the jobs that
  depend on it run again.

Jobs run in dependency order, in this process (``parallel=1``) or as parallel sub-processes (tiny
models leave a GPU mostly idle, so independent fits share it; on a 2-core CPU one process avoids
paying the imports once per job). A job whose dependency failed is skipped (and named), the others
still run, so a partial result is always reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from icp.core import config as cfglib
from icp.core import rundir
from icp.core.errors import ConfigError
from icp.core.paths import EXPERIMENTS


@dataclass
class Job:
    name: str
    kind: str                      # "fit" | "step"
    deps: list[str] = field(default_factory=list)
    cfg: DictConfig | None = None  # fits: the resolved fit config
    spec: dict = field(default_factory=dict)  # steps: what the step needs
    cost: float = 1.0              # rough relative duration: long jobs start first
    needs: tuple[str, ...] = ()    # fits: files (relative to the run dir) consumers read
    key: str = ""                  # steps: hash of what the result depends on
    result: Path | None = None     # steps: the JSON file the step writes (holding ``key``)

    @property
    def run_dir(self) -> Path:
        return rundir.run_dir_of(self.cfg)


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_device(cfg: DictConfig) -> str:
    device = str(OmegaConf.select(cfg, "device", default="auto"))
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, not {device!r}")
    return device


def shards_dirs(cfg: DictConfig) -> tuple[Path, Path]:
    out = Path(cfg.data.out)
    return out / "train", out / "heldout"


def render_data(cfg: DictConfig) -> dict:
    """Training and held-out shards; each shard is skipped when already rendered with this config."""
    from icp.data.shards.write import synth

    d = cfg.data
    train, heldout = shards_dirs(cfg)
    # Held-out identities are a disjoint index range of the same generator: never seen in training.
    synth(train, identities=d.identities, views=d.views, resolution=d.resolution, seed=d.seed,
          workers=d.workers, shard_size=d.shard_size)
    synth(heldout, identities=d.heldout_identities, views=d.views, resolution=d.resolution, seed=d.seed,
          workers=d.workers, shard_size=d.shard_size, first_identity=d.identities)
    return {"train": str(train), "heldout": str(heldout)}


def fit_config(cfg: DictConfig, root: Path, experiment: str, config_file: str, overrides: list[str]) -> DictConfig:
    """The ``icp fit`` config of one job: its experiment file plus the data, device and job overrides."""
    train, heldout = shards_dirs(cfg)
    accelerator = "gpu" if resolve_device(cfg) == "cuda" else "cpu"
    base = [
        # No run.name: the sub-run is named by its config hash, so a changed config trains afresh
        # instead of continuing a checkpoint made from other data or settings.
        f"run.root={root}", f"experiment={experiment}", f"seed={cfg.seed}",
        f"data.shards={train}", f"data.val_shards={heldout}", f"data.resolution={cfg.data.resolution}",
        f"trainer.accelerator={accelerator}", "trainer.devices=1",
    ]
    return cfglib.load(EXPERIMENTS / config_file, base + [str(o) for o in overrides])


def fit_reached_end(job: Job) -> bool:
    metrics = job.run_dir / "fit_metrics.json"
    return metrics.is_file() and json.loads(metrics.read_text()).get("global_step", -1) >= int(job.cfg.trainer.max_steps)


def is_done(job: Job) -> bool:
    """The one cache rule (see the module docstring)."""
    if job.kind == "fit":
        run = job.run_dir
        return (fit_reached_end(job) and (run / "checkpoints" / "last.ckpt").is_file()
                and all((run / n).exists() for n in job.needs))
    return has_result(job)


def has_result(job: Job) -> bool:
    """What a report reads is there: a fit's final metrics (checkpoints may be left behind when a root is
    fetched from another machine), a step's result with the same key."""
    if job.kind == "fit":
        return fit_reached_end(job)
    if job.result is None or not job.result.is_file():
        return False
    try:
        return json.loads(job.result.read_text()).get("key") == job.key
    except (ValueError, AttributeError):
        return False


def write_result(job: Job, result: dict) -> Path:
    """A step's result, atomically, with its key (what makes it a cache hit next time)."""
    job.result.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.result.with_suffix(".tmp")
    tmp.write_text(json.dumps({**result, "key": job.key}, indent=1, default=float))
    tmp.replace(job.result)
    return job.result


class Timeline:
    """When each job (and phase) started and ended, in seconds since this invocation began.

    With a ``path`` the spans are kept in a JSON file across invocations: a re-run (after a time
    limit cut the first one short, say) skips the finished jobs, and the report still shows how
    long each of them took in the invocation that ran it (:meth:`history`).
    """

    def __init__(self, path: Path | None = None, record: bool = True) -> None:
        self.t0 = time.time()
        self.spans: dict[str, dict] = {}
        self.path = path
        self.record = record  # False: read the history only (a report rebuilt later adds no invocation)
        self.finished = False  # set by finish(); an invocation that was killed stays unfinished
        self.earlier: list[dict] = []
        if path is not None and path.is_file():
            try:
                self.earlier = list(json.loads(path.read_text()).get("invocations", []))
            except (ValueError, AttributeError):  # a torn file from a killed run: start a new history
                self.earlier = []

    def start(self, name: str) -> None:
        self.spans[name] = {"start": round(time.time() - self.t0, 1)}
        self._save()

    def end(self, name: str, status: str) -> None:
        span = self.spans.setdefault(name, {"start": round(time.time() - self.t0, 1)})
        span["end"] = round(time.time() - self.t0, 1)
        span["seconds"] = round(span["end"] - span["start"], 1)
        span["status"] = status
        self._save()

    def finish(self) -> None:
        """Mark this invocation as ended normally (one that was killed stays unfinished)."""
        self.finished = True
        self._save()

    def invocations(self) -> list[dict]:
        """Every invocation so far, this one last: {started, wall, finished, spans}."""
        if not self.record:
            return list(self.earlier)
        now = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0)),
               "wall": round(time.time() - self.t0, 1), "finished": self.finished, "spans": self.spans}
        return [*self.earlier, now]

    def history(self) -> dict[str, dict]:
        """job -> the span of its latest invocation that ran it (not just found it cached), with
        ``invocation`` (1-based); a job only ever cached is absent."""
        out: dict[str, dict] = {}
        for i, inv in enumerate(self.invocations(), 1):
            for name, span in inv["spans"].items():
                if span.get("status") != "cached":
                    out[name] = {**span, "invocation": i}
        return out

    def _save(self) -> None:
        if self.path is None or not self.record:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"invocations": self.invocations()}, indent=1))
        tmp.replace(self.path)


def order(jobs: dict[str, Job]) -> list[str]:
    """Topological order, longer jobs first among the ready ones."""
    done: list[str] = []
    left = dict(jobs)
    while left:
        ready = sorted((n for n, j in left.items() if all(d in done for d in j.deps)), key=lambda n: -left[n].cost)
        if not ready:
            raise ValueError(f"circular or missing dependencies among {sorted(left)}")
        done.append(ready[0])
        del left[ready[0]]
    return done


def run(jobs: dict[str, Job], execute: Callable[[Job], None], command: Callable[[Job], list[str]] | None = None,
        parallel: int = 1, log_dir: Path | None = None, timeline: Timeline | None = None,
        on_change: Callable[[], None] = lambda: None, env: dict | None = None, force: tuple[str, ...] = (),
        prefix: str = "icp", raise_errors: bool = False) -> dict[str, str]:
    """Run every job not yet done (and those in ``force``); returns name -> "cached" | "done" | "failed" | "skipped"."""
    timeline = timeline or Timeline()
    status: dict[str, str] = {}
    for name in order(jobs):
        if name not in force and is_done(jobs[name]):
            status[name] = "cached"
            print(f"{prefix}: {name}: up to date, skipped", flush=True)
    total = len(jobs)

    def blocked(name: str) -> bool:
        return any(status.get(d) in ("failed", "skipped") for d in jobs[name].deps)

    def ready() -> list[str]:
        waiting = [n for n in order(jobs) if n not in status]
        for n in waiting:
            if blocked(n):
                status[n] = "skipped"
                print(f"{prefix}: {n}: skipped (a dependency failed)", flush=True)
        return [n for n in waiting if n not in status and all(status.get(d) in ("cached", "done") for d in jobs[n].deps)]

    if parallel <= 1:
        while names := ready():
            name = names[0]
            timeline.start(name)
            print(f"{prefix} [{len(status) + 1}/{total}] {name} ...", flush=True)
            try:
                execute(jobs[name])
                status[name] = "done"
            except Exception as err:  # noqa: BLE001 -- report it, keep the other jobs going
                if raise_errors:  # a single pipeline (icp run): the user's error, one line, from the CLI
                    timeline.end(name, "failed")
                    raise
                status[name] = "failed"
                print(f"{prefix}: {name} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
            timeline.end(name, status[name])
            print(f"{prefix}: {name}: {status[name]} in {timeline.spans[name]['seconds']:.0f} s", flush=True)
            on_change()
        return status

    log_dir.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    while True:
        for name in ready():
            if name in running:
                continue
            if len(running) >= parallel:
                break
            log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 -- closed when the job ends
            proc = subprocess.Popen(command(jobs[name]), stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
            running[name] = (proc, log)
            timeline.start(name)
            print(f"{prefix}: {name} started (log: {log_dir / (name + '.log')})", flush=True)
        if not running:
            return status
        time.sleep(0.5)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            status[name] = "done" if proc.returncode == 0 else "failed"
            timeline.end(name, status[name])
            tail = "" if proc.returncode == 0 else f" (exit {proc.returncode}; see {log_dir / (name + '.log')})"
            print(f"{prefix}: {name}: {status[name]} in {timeline.spans[name]['seconds']:.0f} s{tail}", flush=True)
            on_change()
