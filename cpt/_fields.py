"""Checks of fields read from JSON files, each failure one ValueError naming file, field, value;
and of the values the API and the command line share with them (seeds)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON ``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A number (`is_number`) that is neither NaN nor infinite, nor an int too large for a float."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range, which math converts to first
        return False


MAX_SEED = 2**64 - 1
"""The largest seed: torch's generators take an unsigned 64-bit integer (``torch.manual_seed``)."""


def check_seed(name: str, value: Any) -> int:
    """Returns ``value`` if it is an integer in [0, `MAX_SEED`], the seeds every generator takes.

    Raises:
        ValueError: naming ``name`` and the value.
    """
    if not is_int(value) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2**64 - 1], got {show(value)}")
    return value


def show(value: Any) -> str:
    """``repr(value)``, cut to 80 characters for a message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_header(meta: dict[str, Any], where: Path, kind: str, newest: int) -> int:
    """Checks ``meta["format"] == kind`` and ``1 <= meta["format_version"] <= newest``.

    Returns:
        The format version.

    Raises:
        ValueError: naming the file, the field and the value; a newer version asks for an
            upgrade.
    """
    if meta.get("format") != kind:
        raise ValueError(f"{where}: field 'format' must be {kind!r}, got {show(meta.get('format'))}")
    version = meta.get("format_version")
    if not is_int(version) or version < 1:
        raise ValueError(f"{where}: field 'format_version' must be an integer >= 1, got {show(version)}")
    if version > newest:
        raise ValueError(f"{where.parent} was written by a newer cpt (format version {version}); upgrade cpt")
    return version
