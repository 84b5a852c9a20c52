"""argparse types with bounds, for the module entry points (``python -m icp.eval.…``): a value out
of range or not a whole number is one argparse error line (exit 2), not a traceback or an hour-long run."""

from __future__ import annotations

import argparse


def int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value
    parse.__name__ = f"int {low}..{high}"
    return parse
