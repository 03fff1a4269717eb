"""Argument types and actions of the ``qfleet`` command line, and its consoles (standard
library only at import: the parser is built before anything heavy loads)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


class Version(argparse.Action):
    """``--version``, computed only when asked (it asks git for the checkout's commit)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from qfleet.sysinfo import version_line

        print(version_line())
        parser.exit()


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value}: must be a finite number > 0")
    return value


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be whole numbers separated by commas, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be distinct and >= 0")
    return seeds


def consoles() -> tuple[Console, Console]:
    """(stdout, stderr) consoles that never wrap a line themselves."""
    from rich.console import Console

    return Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)


def escape(text: object) -> str:
    """``text`` with rich markup escaped (a path or a user's string printed as is)."""
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))
