"""Argument types and actions of the ``qfleet`` command line (standard library only: the
parser is built before anything heavy loads)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


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


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be whole numbers separated by commas, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be distinct and >= 0")
    return seeds
