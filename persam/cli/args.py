"""Argument helpers shared by the ``persam`` command line and ``persam eval``.

Only argparse pieces live here (type functions, the parser class, and :func:`in_flags`, which words
the library's errors in flags); the entry module is :mod:`persam.cli.commands`.  Type functions
raise ``argparse.ArgumentTypeError`` so that argparse prints one line naming the flag.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable

from persam.errors import SettingError


class UsageError(Exception):
    """Raised by :class:`Parser` instead of exiting: ``UsageError(parser, message)``."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UsageError` instead of exiting, and reads values
    that start with a minus and a digit (``--ref-point -3,300``) as values, not as options."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse's own matcher only knows plain numbers (-3, -.5); no option of ours starts
        # with a digit, so any "-<digit>..." or "-.<digit>..." token (e.g. -3,300) is a value,
        # and so are -inf / -nan (for a type function to refuse by name).
        self._negative_number_matcher = re.compile(r"^-(\.?\d|(inf|infinity|nan)$)", re.IGNORECASE)

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(self, message)


def in_flags(exc: BaseException) -> str:
    """The message of `exc`, the settings a SettingError names (persam.errors) worded as their flags:
    device -> --device, ref_mask -> --ref-mask."""
    return exc.worded(lambda setting: "--" + setting.replace("_", "-")) if isinstance(exc, SettingError) else str(exc)


def numbers(text: str, count: int, what: str) -> tuple:
    """`count` finite comma-separated numbers, e.g. ``"10,20"``."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def point(text: str) -> tuple:
    return numbers(text, 2, "X,Y (pixels)")


def box(text: str) -> tuple:
    value = numbers(text, 4, "X0,Y0,X1,Y1 (pixels)")
    if value[2] <= value[0] or value[3] <= value[1]:
        raise argparse.ArgumentTypeError(f"box {text!r} is empty: X1 must exceed X0 and Y1 must exceed Y0")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """A frame index: 0, 1, 2, ..."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a frame index (0, 1, 2, ...), got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def float_range(low: float, high: float, what: str = "a number") -> Callable[[str], float]:
    """A type function for a finite float in [low, high] (NaN and infinities are refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"expected {what} between {low:g} and {high:g}, got {text!r}")
        return value

    parse.__name__ = f"float in [{low:g}, {high:g}]"
    return parse


# a cosine similarity: the target/concept feature similarity lies in [-1, 1]
similarity = float_range(-1.0, 1.0, "a cosine similarity")
