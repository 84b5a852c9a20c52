"""The ``icp`` command. Each verb lives in its own module exposing ``register(subparsers)``.

Errors caused by the user's input surface as one line (``icp: error: ...``) with exit status 2;
``ICP_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import warnings

from icp import __version__
from icp.core.errors import IcpError

# Modules that add verbs, in the order `icp --help` lists them.
VERB_MODULES = (
    "icp.cli.fit",          # fit
    "icp.cli.run",          # run (the main job: data -> training -> report)
    "icp.cli.shards",  # shards synth|import|check
    "icp.cli.generate",     # generate
    "icp.cli.eval",         # eval, leaderboard
    "icp.cli.slurm",        # slurm submit
)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test capture swaps it between calls)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icp",
        description="IC-Portrait experiments: synthetic data, training, generation, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"icp {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERB_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logger = logging.getLogger("icp")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):  # main() may run many times
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("icp: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # Library deprecation chatter is not actionable for a user of the CLI.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except IcpError as err:
        if os.environ.get("ICP_DEBUG"):
            raise
        print(f"icp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("icp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
