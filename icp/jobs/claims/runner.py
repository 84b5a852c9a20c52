"""Run a plan's jobs in dependency order: in this process (``jobs=1``) or as parallel sub-processes.

Tiny 32-px models leave a GPU mostly idle (each step is a few hundred small kernel launches), so
independent fits run side by side as separate processes sharing the GPU; on a 2-core CPU there is
nothing to gain and one process avoids paying the imports once per job. Each sub-process writes
its output to ``<root>/logs/<job>.log``; the coordinator prints one line per start and finish.
A job whose dependency failed is skipped (and named), the others still run, so a partial result
is always reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from icp.jobs.claims.plan import Job


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
