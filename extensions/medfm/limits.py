"""Limits that users can raise through environment variables (documented in the README)."""

from __future__ import annotations

import os

from .errors import MedfmError

__all__ = ["positive_setting"]


def positive_setting(variable: str, default: float, unit: str) -> float:
    """``$variable`` as a positive number (``default`` when unset); a one-line error naming it otherwise."""
    text = os.environ.get(variable, str(default))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise MedfmError(f"${variable}={text!r} is not a positive number of {unit}")
    return value
