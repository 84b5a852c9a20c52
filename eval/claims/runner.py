"""Run a plan's jobs in dependency order: in this process (``jobs=1``) or as parallel sub-processes.

Tiny 32-px models leave a GPU mostly idle (each step is a few hundred small kernel launches), so
independent fits run side by side as separate processes sharing the GPU; on a 2-core CPU there is
nothing to gain and one process avoids paying the imports once per job. Each sub-process writes
its output to ``<root>/logs/<job>.log``; the coordinator prints one line per start and finish.
A job whose dependency failed is skipped (and named), the others still run, so a partial result
is always reported.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from claims.plan import Job


class Timeline:
    """When each job (and phase) started and ended, in seconds since the run began."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.spans: dict[str, dict] = {}

    def start(self, name: str) -> None:
        self.spans[name] = {"start": round(time.time() - self.t0, 1)}

    def end(self, name: str, status: str) -> None:
        span = self.spans.setdefault(name, {"start": round(time.time() - self.t0, 1)})
        span["end"] = round(time.time() - self.t0, 1)
        span["seconds"] = round(span["end"] - span["start"], 1)
        span["status"] = status


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


def run(jobs: dict[str, Job], is_done: Callable[[Job], bool], execute: Callable[[Job], None],
        command: Callable[[Job], list[str]], parallel: int, log_dir: Path, timeline: Timeline,
        on_change: Callable[[], None] = lambda: None, env: dict | None = None) -> dict[str, str]:
    """Run every job not yet done; returns name -> "cached" | "done" | "failed" | "skipped"."""
    status: dict[str, str] = {}
    for name in order(jobs):
        if is_done(jobs[name]):
            status[name] = "cached"
            print(f"paper_claims: {name}: up to date, skipped", flush=True)
    total = len(jobs)

    def blocked(name: str) -> bool:
        return any(status.get(d) in ("failed", "skipped") for d in jobs[name].deps)

    def ready() -> list[str]:
        waiting = [n for n in order(jobs) if n not in status]
        for n in waiting:
            if blocked(n):
                status[n] = "skipped"
                print(f"paper_claims: {n}: skipped (a dependency failed)", flush=True)
        return [n for n in waiting if n not in status and all(status.get(d) in ("cached", "done") for d in jobs[n].deps)]

    if parallel <= 1:
        while names := ready():
            name = names[0]
            timeline.start(name)
            print(f"paper_claims [{len(status) + 1}/{total}] {name} ...", flush=True)
            try:
                execute(jobs[name])
                status[name] = "done"
            except Exception as err:  # noqa: BLE001 -- report it, keep the other claims going
                status[name] = "failed"
                print(f"paper_claims: {name} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
            timeline.end(name, status[name])
            print(f"paper_claims: {name}: {status[name]} in {timeline.spans[name]['seconds']:.0f} s", flush=True)
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
            print(f"paper_claims: {name} started (log: {log_dir / (name + '.log')})", flush=True)
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
            print(f"paper_claims: {name}: {status[name]} in {timeline.spans[name]['seconds']:.0f} s{tail}", flush=True)
            on_change()
