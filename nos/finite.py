"""Whether a value read from a config file or a caller is a finite number: plain Python, importable anywhere."""

from __future__ import annotations

import math
from typing import Any


def is_finite_number(value: Any) -> bool:
    """A finite int or float (not a bool); TOML reads integers of any size, past a float's range too."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


__all__ = ["is_finite_number"]
