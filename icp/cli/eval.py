"""``icp eval RUN`` and ``icp leaderboard RUN...`` (see eval/protocol.md).

RUN is any run icp.core.runs.resolve takes: an ``icp fit`` run, a checkpoint in it, the main
job's root (``runs/quickstart/main``), a claims sub-run; the leaderboard also takes metrics.json files.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure a trained run under the benchmark protocol -> metrics.json",
                       description="Generate the protocol's held-out pairs with the run's model and score them. "
                                   "The held-out shards, embedder and resolution default to the run's own. "
                                   "Writes RUN/eval/metrics.json (schema icp-metrics/2: values, intervals, "
                                   "extractors + weight sha256, data manifest sha256, protocol id, config hash, "
                                   "code version).")
    p.add_argument("target", metavar="RUN", help="a run directory (`icp fit`'s, the main job's root such as "
                   "runs/quickstart/main, a claims sub-run), a checkpoint in its checkpoints/, or a sweep "
                   "(its sweeps/<id>/ folder: every point)")
    p.add_argument("overrides", nargs="*", help="protocol dotlist overrides, e.g. dataset.shards=data_shards/synth/eval "
                   "metrics.embedder=runs/embedder/x/embedder.pt (anywhere on the line)")
    p.add_argument("--protocol", default=None, help="protocol YAML (default: eval/protocol.yaml)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--out", default=None, help="where to write metrics.json (default: RUN/eval/metrics.json)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that needs full unpickling: this RUNS CODE stored in the file; "
                        "only for checkpoints from people you trust")
    p.set_defaults(func=run_eval)

    q = sub.add_parser("leaderboard", help="rank runs evaluated under one protocol -> Markdown + HTML + plot",
                       description="Refuses entries of different protocols and entries whose weights or data "
                                   "changed since they were evaluated.")
    q.add_argument("entries", nargs="+", help="runs of any kind (their eval/metrics.json, else the main job's "
                   "evaluate/metrics.json), metrics.json files, or a sweep (sweeps/<id>/: one row per point)")
    q.add_argument("--out", default="leaderboard", help="output folder (default: ./leaderboard)")
    q.add_argument("--sort", default=None, help="metric to rank by (default: id_cos_icp, else id_cos_dlib, else fid)")
    q.set_defaults(func=run_leaderboard)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from icp.core.errors import ConfigError
    from icp.core.runs import sweep_points
    from icp.eval.record import load_protocol, run_eval as evaluate_run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    points = sweep_points(args.target)
    if points is not None and args.out:
        raise ConfigError(f"{args.target} is a sweep: each point writes its own RUN/eval/metrics.json; drop --out")
    targets = [(p.run_dir, p.label) for p in points] if points is not None else [(args.target, None)]
    for i, (target, label) in enumerate(targets):
        if label is not None:
            print(f"icp eval: sweep point {i + 1}/{len(targets)}: {label}")
        protocol = load_protocol(args.protocol, args.overrides)  # afresh: each run fills in its own defaults
        path = evaluate_run(target, protocol, device=device, out=args.out, trust_checkpoint=args.trust_checkpoint)
        show(path)
    return 0


def show(path) -> None:
    import json

    record = json.loads(path.read_text())
    empty = set(record.get("no_valid_samples", []))
    for row in record["rows"]:  # value with its identity-bootstrap interval where it has one
        name, value = row["name"], row.get("value")
        if row.get("unavailable"):
            print(f"{name:>18s}  unavailable: {row['unavailable']}")
        elif name in empty or value is None:
            print(f"{name:>18s}  no valid sample (e.g. no face detected in any output)")
        else:
            print(f"{name:>18s}  {row.get('interval') or format(value, '.4f')}")
    print(record["summary"])
    print(f"icp: wrote {path}")


def run_leaderboard(args: argparse.Namespace) -> int:
    from icp.eval.leaderboard import build

    paths = build(args.entries, args.out, sort_by=args.sort)
    print(f"icp: wrote {paths['markdown']}, {paths['html']}, {paths['plot']}")
    return 0
