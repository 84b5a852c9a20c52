"""Reproduce IC-Portrait's claims at small scale (issue 10): one command, one report.

    python eval/paper_claims.py                                   # GPU size, eval/paper_claims.yaml
    python eval/paper_claims.py --config tests/configs/paper_claims_ci.yaml root=/tmp/pc
    python eval/paper_claims.py --jobs 4 claims.warping.pairs_per_bucket=64

Phases: synthetic shards -> identity embedder + pretrained base (``experiments/base_pretrain.yaml``)
-> Lighting-Aware Stitching at each mask ratio -> View-Consistent Adaptation (Matching Net from the
base / from random weights / without the warp) -> held-out evaluations -> ``<report>.md`` / ``.json``
and PNGs in a folder beside it. Every fit is an ordinary ``icp fit`` run under ``<root>/fits``
(cached: a re-run skips finished fits and evaluations), independent ones run as parallel
sub-processes (``--jobs``; default 7 on CUDA, 1 on CPU), and the report is rewritten after every
job, so a run that is cut short still leaves its tables. Device: ``device=auto|cpu|cuda``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from icp.jobs.claims import plan as planlib  # noqa: E402
from icp.jobs import runner  # noqa: E402

from icp.core import config as cfglib  # noqa: E402
from icp.data.shards.format import MANIFEST  # noqa: E402
from icp.core.errors import DataError, IcpError  # noqa: E402
from icp.core.paths import EVAL  # noqa: E402
from icp.jobs.runner import resolve_device, shards_dirs  # noqa: E402

DEFAULT_CONFIG = EVAL / "paper_claims.yaml"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="dotlist overrides of the config, e.g. claims.masking.pairs=32")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="claims config (default: eval/paper_claims.yaml)")
    p.add_argument("--jobs", type=int, default=None, help="parallel sub-processes (default: config `jobs`, "
                                                          "else 7 on CUDA and 1 on CPU; 1 runs all in this process)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the report from what <root> holds (fits, evaluations, timeline.json); run nothing")
    p.add_argument("--run-job", default=None, help=argparse.SUPPRESS)  # internal: one job in a sub-process
    return p.parse_args(argv)


def execute(cfg, job: planlib.Job, device: str) -> None:
    """Run one job in this process."""
    if job.kind == "fit":
        from icp.jobs.fit import fit

        fit(job.cfg)
        if not runner.is_done(job):
            raise RuntimeError(f"fit {job.name} ended without reaching trainer.max_steps ({job.run_dir})")
        return
    from icp.jobs.claims import measure

    out_dir = Path(cfg.root) / "evals"
    out_dir.mkdir(parents=True, exist_ok=True)
    runner.write_result(job, measure.CLAIMS[job.spec["claim"]](cfg, job.spec, out_dir, job.name, device))


def seed_configs(cfg) -> dict[int, object]:
    """One config per seed (``seeds`` in the study config, else ``seed``): each seed's fits and
    evaluations live under ``<root>/seed<S>``; the shards are shared (the data seed is its own)."""
    from omegaconf import OmegaConf

    seeds = [int(x) for x in (cfg.get("seeds") or [cfg.seed])]
    out = {}
    for seed in seeds:
        c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        c.seed, c.root = seed, str(Path(cfg.root) / f"seed{seed}")
        c.report = str(Path(cfg.report) / f"seed{seed}") if len(seeds) > 1 else str(cfg.report)
        out[seed] = c
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        cfg = cfglib.load(args.config, args.overrides)
        device = resolve_device(cfg)
        per_seed = seed_configs(cfg)
        plans = {seed: planlib.build(c) for seed, c in per_seed.items()}
        if args.run_job:
            seed, name = args.run_job.split("/", 1)
            execute(per_seed[int(seed)], plans[int(seed)][name], device)
            return 0
        if args.report_only:
            return report_only(cfg, args, per_seed, plans, device)
        return coordinate(cfg, args, per_seed, plans, device)
    except IcpError as err:
        print(f"paper_claims: error: {err}", file=sys.stderr)
        return 2


def _config_name(path: str, overrides: list[str]) -> str:
    """The config file (relative where it is inside the checkout) and the overrides that shaped the results."""
    rel = os.path.relpath(path)
    shown = [o for o in overrides if not o.startswith(("report=", "root="))]
    return " ".join([path if rel.startswith("..") else rel, *shown])


def write_reports(cfg, per_seed: dict, plans: dict, timelines: dict, statuses: dict, device: str, final: bool,
                  config_name: str) -> Path:
    """Each seed's own report (when there are several) and the pooled one at ``cfg.report``."""
    from icp.jobs.claims import report, results

    founds = {seed: results.collect(c, plans[seed]) for seed, c in per_seed.items()}
    if len(per_seed) > 1:
        for seed, c in per_seed.items():
            report.write(c, plans[seed], timelines[seed], statuses[seed], device, final, config_name)
    first = next(iter(per_seed))
    top = per_seed[first].copy()
    top.report = str(cfg.report)
    return report.write(top, plans[first], timelines[first], statuses[first], device, final, config_name,
                        founds=list(founds.values()), seeds=list(founds))


def report_only(cfg, args, per_seed: dict, plans: dict, device: str) -> int:
    """The report of a root fetched from elsewhere (a cluster, a GPU machine), without running a job."""
    timelines, statuses = {}, {}
    for seed, c in per_seed.items():
        root = Path(c.root)
        if not (root / "timeline.json").is_file():
            raise DataError(f"{root / 'timeline.json'} not found: --report-only needs a root that eval/paper_claims.py "
                            "ran in (set root=...)")
        timelines[seed] = runner.Timeline(root / "timeline.json", record=False)
        statuses[seed] = {name: "cached" if runner.has_result(job) else "missing" for name, job in plans[seed].items()}
    final = all(s == "cached" for st in statuses.values() for s in st.values())
    path = write_reports(cfg, per_seed, plans, timelines, statuses, device, final,
                         _config_name(args.config, args.overrides))
    missing = sorted(f"seed {seed}: {n}" for seed, st in statuses.items() for n, s in st.items() if s != "cached")
    print(f"paper_claims: report {path}" + (f" (PARTIAL: {', '.join(missing)} missing)" if missing else ""))
    return 0 if final else 1


def coordinate(cfg, args, per_seed: dict, plans: dict, device: str) -> int:
    parallel = args.jobs or cfg.get("jobs") or (7 if device == "cuda" else 1)
    config_name = _config_name(args.config, args.overrides)
    timelines = {seed: runner.Timeline(Path(c.root) / "timeline.json") for seed, c in per_seed.items()}
    statuses: dict[int, dict[str, str]] = {seed: {} for seed in per_seed}
    first = next(iter(per_seed))
    timeline = timelines[first]
    print(f"paper_claims: {sum(len(p) for p in plans.values())} jobs ({len(per_seed)} seed(s)) on {device}, "
          f"{parallel} at a time, runs under {cfg.root}", flush=True)
    timeline.start("data")
    rendered = all((d / MANIFEST).is_file() for d in shards_dirs(cfg))
    runner.render_data(cfg)  # shards: skipped per shard when already rendered (the manifest checks the config)
    timeline.end("data", "cached" if rendered else "done")
    statuses[first]["data"] = timeline.spans["data"]["status"]

    def write(final: bool = False) -> Path:
        return write_reports(cfg, per_seed, plans, timelines, statuses, device, final, config_name)

    threads = max(1, (os.cpu_count() or 1) // parallel)
    command = [sys.executable, "-m", "icp.jobs.claims", "--config", str(args.config), *args.overrides]
    for seed, c in per_seed.items():
        found = runner.run(
            plans[seed], execute=lambda j, c=c: execute(c, j, device), prefix=f"paper_claims (seed {seed})",
            command=lambda j, seed=seed: [*command, "--run-job", f"{seed}/{j.name}"], parallel=parallel,
            log_dir=Path(c.root) / "logs", timeline=timelines[seed], on_change=write,
            env={"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
        statuses[seed].update(found)
        timelines[seed].finish()
    path = write(final=True)
    for seed, tl in timelines.items():
        print(f"paper_claims: seed {seed}, phase timings (s since start):")
        for name, span in tl.spans.items():
            print(f"  {name:24s} {span.get('status', ''):8s} start {span['start']:7.1f}  took {span.get('seconds', 0):7.1f}")
    print(f"paper_claims: total {time.time() - timeline.t0:.0f} s; report {path}")
    return 0 if all(s in ("done", "cached") for st in statuses.values() for s in st.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
