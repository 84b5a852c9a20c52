"""Options and ``key=value`` overrides in any order, for every verb that takes overrides.

argparse fills a ``nargs="*"`` positional with the run of words right after the positional before
it, so in ``icp fit CFG --dry-run trainer.max_steps=5`` the override after the option is left
over and refused, and in ``icp run CFG --only evaluate report device=cuda`` the override is taken
as a stage name. ``parse_intermixed_args`` refuses parsers with subparsers (every verb is one).
So the overrides are taken out of the line first -- every ``key=value`` word after the verb's
leading positionals (CONFIG, RUN) that is not the value of an option taking one -- and handed to
the verb's ``overrides`` in their order on the line; argparse parses the rest as usual and still
refuses anything it does not know, with its own message.
"""

from __future__ import annotations

import argparse
import sys

OVERRIDES = "overrides"  # the dest of every verb's dotlist positional


def is_override(word: str) -> bool:
    return "=" in word and not word.startswith("-")


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:  # argparse keeps no public list of a parser's subparsers
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _leading(parser: argparse.ArgumentParser) -> int | None:
    """How many positionals come before the verb's overrides (None: the verb takes none)."""
    positionals = [a for a in parser._actions if not a.option_strings]
    names = [a.dest for a in positionals]
    return names.index(OVERRIDES) if OVERRIDES in names else None


def _values_taken(parser: argparse.ArgumentParser, word: str) -> int:
    """How many following words the option ``word`` consumes (``--out x``: 1; ``--dry-run``: 0;
    ``--only a b``: as many as are not options or overrides, counted by the caller as -1)."""
    if "=" in word:
        return 0  # --out=x carries its value
    action = parser._option_string_actions.get(word)
    if action is None or action.nargs == 0:
        return 0
    if action.nargs is None:
        return 1
    return action.nargs if isinstance(action.nargs, int) else -1


def split(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """(the line without the verb's overrides, the overrides in their order)."""
    rest: list[str] = []
    moved: list[str] = []
    level, seen, pending, greedy = parser, 0, 0, False
    for i, word in enumerate(argv):
        if word == "--":  # everything after is positional: leave it to argparse
            rest += argv[i:]
            break
        if pending:
            rest.append(word)
            pending -= 1
            continue
        subs = _subparsers(level)
        if word in subs and not word.startswith("-"):
            level, seen, greedy = subs[word], 0, False
            rest.append(word)
            continue
        if word.startswith("-"):
            taken = _values_taken(level, word)
            pending, greedy = max(taken, 0), taken < 0
            rest.append(word)
            continue
        leading = _leading(level)
        if leading is not None and seen >= leading and is_override(word):
            moved.append(word)
            continue
        if not greedy:
            seen += 1
        rest.append(word)
    return rest, moved


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` that also takes overrides after (or between) options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, moved = split(parser, argv)
    args = parser.parse_args(rest)
    if moved:
        setattr(args, OVERRIDES, [*(getattr(args, OVERRIDES, None) or []), *moved])
    return args
