# SPDX-License-Identifier: Apache-2.0
"""Argument checks for vkv's public entry points: one rule for what counts as an integer.

An integer argument (a count, a slot, a page index, a size in bytes) is a Python int or a numpy integer.
Refused, with an InvalidRequestError that names the argument and says what was expected: bools (True is
not slot 1), floats (even 2.0), strings, None, tensors and numpy bools. Every check runs before the
operation changes anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import InvalidRequestError


def is_int(value: Any) -> bool:
    """True for ints and numpy integers; False for bools and everything else."""
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, (int, np.integer))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_int(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi] (either bound may be None). Raises InvalidRequestError otherwise."""
    if not is_int(value):
        raise InvalidRequestError(f"{name} must be an int, got {type(value).__name__} {_shown(value)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_text = "-inf" if lo is None else str(lo)
        hi_text = "inf" if hi is None else str(hi)
        raise InvalidRequestError(f"{name} must be an int in [{lo_text}, {hi_text}], got {value}")
    return value


def check_count(name: str, value: Any, *, hi: int | None = None) -> int:
    """A count >= 0 (at most ``hi``)."""
    return check_int(name, value, lo=0, hi=hi)


def check_positive(name: str, value: Any, *, hi: int | None = None) -> int:
    """A count >= 1 (at most ``hi``)."""
    return check_int(name, value, lo=1, hi=hi)


def check_ints(name: str, values: Any, *, lo: int | None = None, hi: int | None = None) -> list[int]:
    """Every element of the sequence ``values`` checked by :func:`check_int`; all are checked before the
    caller changes anything. Strings, bytes, tensors and mappings are not sequences of ints."""
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable) or hasattr(values, "dtype"):
        raise InvalidRequestError(f"{name} must be a sequence of ints, got {type(values).__name__} {_shown(values)}")
    out = []
    for i, value in enumerate(values):
        out.append(check_int(f"{name}[{i}]", value, lo=lo, hi=hi))
    return out


def check_multiple(name: str, value: Any, multiple: int, *, lo: int = 0, hi: int | None = None) -> int:
    """An int in [lo, hi] that is a multiple of ``multiple`` (a byte size of whole pages)."""
    value = check_int(name, value, lo=lo, hi=hi)
    if value % multiple:
        raise InvalidRequestError(
            f"{name} = {value} is not a multiple of the page size {multiple}; expected whole pages "
            f"(e.g. {value // multiple * multiple} or {(value // multiple + 1) * multiple})"
        )
    return value


# The ledger stores counts as signed 64-bit integers; every page count and size that reaches it stays below.
INT64_MAX = (1 << 63) - 1


def check_seconds(name: str, value: Any, *, positive: bool = False) -> float:
    """A finite number of seconds, >= 0 (> 0 with ``positive``); ints, floats and numpy floats, not bools."""
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
    if ok:
        value = float(value)
        ok = 0 < value < float("inf") if positive else 0 <= value < float("inf")
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise InvalidRequestError(f"{name} must be a finite number of seconds {bound}, got {_shown(value)}")
    return value
