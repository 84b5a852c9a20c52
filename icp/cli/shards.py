"""`icp shards synth|import|check`: make and validate shard folders."""

from __future__ import annotations

import argparse
import json
import os
import sys


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``shards`` command (with synth/import/check) to an argparse subparsers object."""
    parser = subparsers.add_parser("shards", help="make or check WebDataset shard folders")
    verbs = parser.add_subparsers(dest="shards_verb", metavar="{synth,import,check}")
    verbs.required = True

    synth = verbs.add_parser("synth", help="render synthetic multi-view identities into shards")
    synth.add_argument("out", help="output folder (created; re-running resumes)")
    synth.add_argument("--identities", type=int, required=True)
    synth.add_argument("--views", type=int, default=8)
    synth.add_argument("--resolution", type=int, default=128)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--first-identity", type=int, default=0,
                       help="index of the first identity (give held-out sets a disjoint range)")
    synth.add_argument("--workers", type=int, default=1, help="processes, one shard each at a time")
    synth.add_argument("--shard-size", type=int, default=64, help="identities per shard")
    synth.set_defaults(func=_synth)

    imp = verbs.add_parser("import", help="convert SRC/<identity>/<image>.{jpg,png} photos into shards")
    imp.add_argument("src")
    imp.add_argument("out")
    imp.add_argument("--resolution", type=int, default=128)
    imp.add_argument("--shard-size", type=int, default=64)
    imp.set_defaults(func=_import)

    check = verbs.add_parser("check", help="validate a shard folder against its manifest")
    check.add_argument("path")
    check.add_argument("--no-decode", action="store_true", help="only sha256 and counts (faster)")
    check.set_defaults(func=_check)
    return parser


def _synth(args: argparse.Namespace) -> int:
    from icp.data.shards.write import synth

    manifest = synth(args.out, args.identities, args.views, args.resolution, seed=args.seed,
                     workers=args.workers, shard_size=args.shard_size, first_identity=args.first_identity)
    print(f"{args.out}: {manifest['counts']['samples']} identities, {manifest['counts']['views']} views "
          f"in {manifest['counts']['shards']} shards")
    return 0


def _import(args: argparse.Namespace) -> int:
    from icp.data.shards.imports import import_folder

    report = import_folder(args.src, args.out, resolution=args.resolution, shard_size=args.shard_size)
    print(f"{args.out}: {report['identities']} identities, {report['images']} images imported")
    for item in report["no_face"]:
        print(f"no face: {item}", file=sys.stderr)
    for item in report.get("skipped", []):
        print(f"skipped: {item['path']} ({item['reason']})", file=sys.stderr)
    if report["no_face"] or report["unreadable"]:
        print(f"{len(report['no_face'])} without a face, {len(report['unreadable'])} unreadable: "
              f"see {report['report_path']}", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> int:
    from icp.data.shards.read import check

    # A bad folder is an input error like any other: `icp: error: ...`, exit 2 (ICP_DEBUG=1: traceback).
    counts = check(args.path, decode=not args.no_decode)
    print(json.dumps(counts))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m icp.cli.shards``); icp/cli.py calls :func:`register`."""
    from icp.core.errors import IcpError

    parser = argparse.ArgumentParser(prog="icp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except IcpError as err:  # the convention of every verb (icp.cli.main)
        if os.environ.get("ICP_DEBUG"):
            raise
        print(f"icp: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
