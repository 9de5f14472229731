"""argparse types the command lines share (``dataprep audit``, ``python -m train_minimal``): a number
or a whole number with a lower bound, a positive number, a share from 0 to 1; each refuses with one
line saying what to give."""
from __future__ import annotations

import argparse
import math


def int_at_least(low: int, advice: str):
    """A whole number of ``low`` or more; ``advice`` says what to give instead."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: {advice}")
        return value
    return parse


def number_at_least(low: float):
    """A number of ``low`` or more (NaN refused)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= low:  # NaN too
            raise argparse.ArgumentTypeError(f"{text}: give {low:g} or more")
        return value
    return parse


def positive_number(text: str) -> float:
    """A finite number above 0 (a learning rate: torch's optimisers refuse a negative or NaN one
    only as a traceback, and take 0 or infinity silently)."""
    value = number_at_least(0.0)(text)
    if value == 0.0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text}: give a finite number above 0")
    return value


def finite_number_at_least(low: float):
    """A finite number of ``low`` or more (a loss weight: NaN or infinity makes every loss NaN)."""
    def parse(text: str) -> float:
        value = number_at_least(low)(text)
        if math.isinf(value):
            raise argparse.ArgumentTypeError(f"{text}: give a finite number, {low:g} or more")
        return value
    return parse


def share(text: str) -> float:
    """A share or an IoU, 0 to 1."""
    value = number_at_least(0.0)(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"{text}: give a value from 0 to 1")
    return value
