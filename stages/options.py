"""The numeric checks of every stage's options, in one place.

Each config dataclass declares ``BOUNDS``: field name -> (test, what it must be). ``check_options``
runs them, and refuses a NaN or infinite value in any float field (a NaN scale or learning rate
would otherwise run to the end and write NaNs into a store or run marked complete). The stages
call it first thing in their ``_validate``, so a bad number is one line before any work starts.
"""
from __future__ import annotations

import dataclasses
import math

from .errors import RaeError

AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
NON_NEGATIVE = (lambda v: v >= 0, "0 or more")
POSITIVE = (lambda v: v > 0, "positive")
UNIT_INTERVAL = (lambda v: 0 <= v < 1, "in [0, 1)")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(cfg) -> None:
    """Raise a one-line ``RaeError`` for the first option of ``cfg`` outside its bounds."""
    bounds = getattr(cfg, "BOUNDS", {})
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise RaeError(f"{flag(field.name)} must be a finite number (got {v})")
        if field.name in bounds and value is not None:
            test, what = bounds[field.name]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not test(v):
                    raise RaeError(f"{flag(field.name)} must be {what} (got {v})")
