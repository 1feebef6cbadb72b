"""Byte counts as people type them: 4096, 64M, 15MiB, 10G, 22.5T (K, M, G, T, P are powers of 1024).

One parser for every command line of the project (the agent's CLI, the VM
rig, the emulated array), each saying what it accepts.
"""

from __future__ import annotations

import argparse
import re
from fractions import Fraction
from typing import Callable

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B)?\s*", re.IGNORECASE)
_UNITS = "KMGTP"


def parse_size(text: str, *, minimum: int = 0, fractions: bool = False, largest: str = "P") -> int:
    """Bytes from `text`; ValueError says why not.

    `fractions` allows 22.5T (the result must still be a whole number of
    bytes); `largest` is the biggest unit accepted; `minimum` the smallest value.
    """
    match = _SIZE.fullmatch(text)
    if not match or ("." in match.group(1) and not fractions):
        raise ValueError(f"{text!r} is not a byte count (e.g. 4096, 64M, 10G)")
    unit = match.group(2).upper()
    if unit and _UNITS.index(unit) > _UNITS.index(largest):
        raise ValueError(f"{text!r}: the largest unit here is {largest}")
    value = Fraction(match.group(1)) * (1 << (10 * (_UNITS.index(unit) + 1) if unit else 0))
    if value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    if value < minimum:
        raise ValueError(f"{text!r}: must be at least {minimum} bytes")
    return int(value)


def size_argument(*, minimum: int = 0, fractions: bool = False, largest: str = "P") -> Callable[[str], int]:
    """parse_size for argparse's type=: its errors are usage errors with the reason."""
    def parse(text: str) -> int:
        try:
            return parse_size(text, minimum=minimum, fractions=fractions, largest=largest)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse
