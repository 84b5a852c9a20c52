"""``icp eval RUN_DIR|CHECKPOINT`` and ``icp leaderboard RUN...`` (see eval/protocol.md)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure a trained run under the benchmark protocol -> metrics.json",
                       description="Generate the protocol's held-out pairs with the run's task and score them. "
                                   "Writes RUN_DIR/eval/metrics.json (values, extractors + weight sha256, "
                                   "data manifest sha256, protocol id, config hash, code version).")
    p.add_argument("target", help="run directory (made by `icp fit`) or a checkpoint in its checkpoints/")
    p.add_argument("overrides", nargs="*", help="protocol dotlist overrides, e.g. metrics.embedder=runs/embedder/x/embedder.pt")
    p.add_argument("--protocol", default=None, help="protocol YAML (default: eval/protocol.yaml)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--out", default=None, help="where to write metrics.json (default: RUN_DIR/eval/metrics.json)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that needs full unpickling: this RUNS CODE stored in the file; "
                        "only for checkpoints from people you trust")
    p.set_defaults(func=run_eval)

    q = sub.add_parser("leaderboard", help="rank runs evaluated under one protocol -> Markdown + HTML + plot",
                       description="Refuses entries of different protocols and entries whose weights or data "
                                   "changed since they were evaluated.")
    q.add_argument("entries", nargs="+", help="run directories (with eval/metrics.json) or metrics.json files")
    q.add_argument("--out", default="leaderboard", help="output folder (default: ./leaderboard)")
    q.add_argument("--sort", default=None, help="metric to rank by (default: id_cos_icp, else id_cos_dlib, else fid)")
    q.set_defaults(func=run_leaderboard)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from icp.eval.record import load_protocol, run_eval as evaluate_run

    protocol = load_protocol(args.protocol, args.overrides)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = evaluate_run(args.target, protocol, device=device, out=args.out, trust_checkpoint=args.trust_checkpoint)
    import json

    record = json.loads(path.read_text())
    for name, value in sorted(record["metrics"].items()):
        print(f"{name:>18s}  {value:.4f}")
    for name in record.get("no_valid_samples", []):
        print(f"{name:>18s}  no valid sample (e.g. no face detected in any output)")
    for name, why in sorted(record["unavailable"].items()):
        print(f"{name:>18s}  unavailable: {why}")
    print(f"icp: wrote {path}")
    return 0


def run_leaderboard(args: argparse.Namespace) -> int:
    from icp.eval.leaderboard import build

    paths = build(args.entries, args.out, sort_by=args.sort)
    print(f"icp: wrote {paths['markdown']}, {paths['html']}, {paths['plot']}")
    return 0
