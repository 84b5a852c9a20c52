"""The ``icp`` command. Each verb lives in its own module exposing ``register(subparsers)``.

Errors caused by the user's input surface as one line (``icp: error: ...``) with exit status 2;
``ICP_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import logging
import os
import re
import sys
import warnings

from icp import __version__
from icp.cli import args as cli_args
from icp.cluster import preempt
from icp.core.errors import IcpError

if sys.argv[1:2] == ["fit"]:
    # Before torch/Lightning import (seconds): Slurm's USR1 must not kill a starting job.
    preempt.install()

# Modules that add verbs, in the order `icp --help` lists them.
VERB_MODULES = (
    "icp.cli.fit",          # fit
    "icp.cli.run",          # run (the main job: data -> training -> report)
    "icp.cli.shards",  # shards synth|import|check
    "icp.cli.generate",     # generate
    "icp.cli.export",       # export (a diffusers folder with model_index.json and the pipeline)
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


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line. An error re-raised by a DataLoader worker carries
    "Caught X in DataLoader worker process N. Original Traceback ...": keep its original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        worker = re.search(r"in (DataLoader worker process \d+)", text)
        last = text.splitlines()[-1]
        last = re.sub(r"^[\w.]+(Error|Exception|Sample): ", "", last)
        text = f"{last} (in {worker.group(1) if worker else 'a DataLoader worker'})"
    return " ".join(text.split("\n")) if "\n" in text else text


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
    args = cli_args.parse(parser, argv)  # options and key=value overrides in any order
    try:
        return int(args.func(args) or 0)
    except IcpError as err:
        if os.environ.get("ICP_DEBUG"):
            raise
        print(f"icp: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        # A full disk, a quota or a read-only folder while writing shards or checkpoints: the files
        # stay atomic (written under a temp name, then renamed); say what and where in one line.
        if os.environ.get("ICP_DEBUG") or err.errno not in _STORAGE_ERRNOS:
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"icp: error: cannot write{where}: {err.strerror or err} (free space or choose another folder; "
              "finished files are intact, running the same command again resumes)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("icp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
