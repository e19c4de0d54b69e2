"""Argument checks shared by every layer: one message per kind of mistake.

    >>> check_fraction("density", 0.3)
    0.3
    >>> check_fraction("density", 0.0)
    Traceback (most recent call last):
    ValueError: density must be in (0, 1], got 0.0

Each check raises before any work or state change and names the argument and the value
it got. Checks that belong to one concept (a mask's shape, a trace's arrays) live with
that concept; these are the generic ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["check_choice", "check_fraction", "check_fractions", "check_int", "check_positive_ints"]


def check_fraction(name: str, value: Any, *, closed_low: bool = False) -> float:
    """``value`` as a float in (0, 1] (or [0, 1] with ``closed_low``), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in {'[' if closed_low else '('}0, 1], "
                         f"got {value!r}")
    v = float(value)
    ok = 0.0 <= v <= 1.0 if closed_low else 0.0 < v <= 1.0
    if not ok:  # also catches NaN
        raise ValueError(f"{name} must be in {'[' if closed_low else '('}0, 1], got {value!r}")
    return v


def check_fractions(name: str, values: Iterable[Any]) -> tuple[float, ...]:
    """Every value in (0, 1] (at least one), as floats in the given order."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list of numbers in (0, 1], got {values!r}")
    out = tuple(values)
    if not out:
        raise ValueError(f"{name} must list at least one value")
    bad = [v for v in out if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
           or not 0.0 < float(v) <= 1.0]
    if bad:
        item = name[:-3] + "y" if name.endswith("ies") else name.removesuffix("s")
        raise ValueError(f"{name} must be fractions: each {item} must be in (0, 1], got {list(out)}")
    return tuple(float(v) for v in out)


def check_positive_ints(name: str, values: Iterable[Any]) -> tuple[int, ...]:
    """Distinct positive integers, sorted (at least one)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list of positive integers, got {values!r}")
    raw = list(values)
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in raw):
        raise ValueError(f"{name} must be positive integers, got {raw}")
    out = tuple(sorted({int(v) for v in raw}))
    if not out:
        raise ValueError(f"{name} must list at least one value")
    if out[0] < 1:
        raise ValueError(f"{name} must be positive integers, got {raw}")
    return out


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (either bound optional), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        bounds = f">= {low}" if high is None else (f"<= {high}" if low is None else f"in [{low}, {high}]")
        raise ValueError(f"{name} must be {bounds}, got {v}")
    return v


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: {name} must be one of {tuple(choices)}")
    return value
