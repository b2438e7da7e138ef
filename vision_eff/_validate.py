"""Small argument checks shared by the technique configs (clear errors that name the field)."""
from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, lo: int) -> None:
    """``value`` must be a real int (not bool) >= ``lo``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
