"""The package's own error type: every bad input a user can make ends in one of these.

Each module keeps its own error class (``ConfigError``, ``SamplingError``,
``CheckpointError``, …) and also derives it from :class:`LlmlabError`, so that a
caller — the command line, a notebook, a test — can tell "the input was wrong,
here is what to do" from a bug. A traceback should reach a user only for a bug.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


class LlmlabError(Exception):
    """Base class of every error llmlab raises on purpose; the message says what to do."""


def require_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None,
                error: type[Exception] = ValueError) -> int:
    """``value`` as an int, or ``error`` naming ``name`` when it is not an integer in range (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise error(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if minimum is not None and value < minimum:
        raise error(f"{name} must be ≥ {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise error(f"{name} must be ≤ {maximum:,}, got {value:,}.")
    return value


def require_finite(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
                   error: type[Exception] = ValueError) -> float:
    """``value`` as a finite float, or ``error`` naming ``name`` (NaN, ±inf, non-numbers, out of range refused)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise error(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value}.")
    if minimum is not None and value < minimum:
        raise error(f"{name} must be ≥ {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise error(f"{name} must be ≤ {maximum}, got {value}.")
    return value
