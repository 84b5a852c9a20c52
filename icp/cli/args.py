"""Options and ``key=value`` overrides in any order, for every verb that takes overrides.

argparse fills a ``nargs="*"`` positional with the run of words right after the positional before
it, so in ``icp fit CFG --dry-run trainer.max_steps=5`` the override after the option is left
over and refused. ``parse_intermixed_args`` would fix that but refuses parsers with subparsers
(every verb is one). Instead the words argparse leaves over are appended to the verb's
``overrides`` when they look like overrides (``key=value``, ``+key=value``); anything else is
still refused as an unrecognised argument, with argparse's own message.
"""

from __future__ import annotations

import argparse

OVERRIDES = "overrides"  # the dest of every verb's dotlist positional


def is_override(word: str) -> bool:
    return "=" in word and not word.startswith("-")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` that also takes overrides placed after (or between) options."""
    args, extras = parser.parse_known_args(argv)
    if extras and isinstance(getattr(args, OVERRIDES, None), list):
        stray = [w for w in extras if not is_override(w)]
        if not stray:
            setattr(args, OVERRIDES, [*getattr(args, OVERRIDES), *extras])  # their order on the line
            return args
        extras = stray
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args
