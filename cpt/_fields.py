"""Checks of fields read from JSON files and of arguments given to the API and the command line
(seeds among them), each failure one ValueError naming the file or argument, the field and the value."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
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
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python will print, or a container of one
        if is_int(value):
            return f"an integer of about {int(value.bit_length() * math.log10(2))} digits"
        return f"a {type(value).__name__} holding an integer too long to print"
    except RecursionError:
        return f"a {type(value).__name__} nested too deep to print"
    return text if len(text) <= 80 else text[:77] + "..."


def text_problem(value: Any) -> str | None:
    """What keeps ``value`` from being a text a tokenizer can take, or None if it is one.

    A text is a `str` that encodes as UTF-8: a lone surrogate (``"\\ud800"`` from a JSON escape,
    or the ``"\\udcff"`` Python makes of a byte that is not UTF-8) is refused here rather than as
    a ``TypeError`` deep in the tokenizer.
    """
    if not isinstance(value, str):
        return f"must be a string, got {show(value)}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"is not valid Unicode: a lone surrogate {value[err.start]!r} at character {err.start} "
            "(bytes that are not UTF-8?)"
        )
    return None


def check_text(value: Any, what: str) -> str:
    """Returns ``value`` if it is a text (`text_problem`).

    Raises:
        ValueError: ``<what> must be a string, got ...`` or ``<what> is not valid Unicode: ...``.
    """
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {problem}")
    return value


def check_distinct(values: Iterable[Any], what: str) -> None:
    """Refuses a value given twice (a label set, a list of names): the one check every label set
    passes, from the command line, an adapter's task, a data set or a call.

    Raises:
        ValueError: ``"{what} holds {value!r} twice (at {i} and {j})"``, for the first repeat.
    """
    first: dict[Any, int] = {}
    for j, value in enumerate(values):
        i = first.setdefault(value, j)
        if i != j:
            raise ValueError(f"{what} holds {value!r} twice (at {i} and {j})")


def check_bool(value: Any, what: str) -> bool:
    """Returns ``value`` if it is True or False (``"no"`` or ``1`` is not a flag).

    Raises:
        ValueError: naming ``what`` and the value.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {show(value)}")
    return value


def check_path(value: Any, what: str) -> str | os.PathLike[str]:
    """Returns ``value`` if it is a non-empty path: a `str` or an `os.PathLike` of one.

    Raises:
        ValueError: naming ``what`` and the value.
    """
    name = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty path (a str or os.PathLike), got {show(value)}")
    check_text(name, what)
    if "\0" in name:  # the OS would refuse it with a bare "embedded null byte"
        raise ValueError(f"{what} holds a NUL character, which no file name can: {show(value)}")
    return value


def as_list(values: Any, what: str, items: str) -> list[Any]:
    """``values``, an iterable that is not a string or a mapping, as a list.

    Raises:
        ValueError: ``<what> must be a sequence of <items>, got ...`` for a string, a mapping, a
            non-iterable, or an object whose iteration fails (a 0-d tensor).
    """
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{what} must be a sequence of {items}, got the string {show(values)}")
    if isinstance(values, Mapping) or not isinstance(values, Iterable):
        raise ValueError(f"{what} must be a sequence of {items}, got {type(values).__name__}")
    try:
        return list(values)
    except TypeError as err:  # iterable by type, not by value: a 0-d tensor or array
        raise ValueError(f"{what} must be a sequence of {items}, got {type(values).__name__} ({err})") from None


def check_instance(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """Returns ``value`` if it is an instance of ``kind``.

    Raises:
        ValueError: ``<what> must be a <kind>, got <type>``.
    """
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{what} must be a {names}, got {type(value).__name__}")
    return value


def int_list(name: str, values: Any) -> list[int]:
    """``values`` as a list of int64-range integers: a list or tuple of ints (NumPy integers
    included), or a 1-D integer tensor. A dict, a set (no order), a string, a float or a bool is
    refused, not converted."""
    import torch  # here, so that this module stays light for the command line

    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {values.dim()}-D {values.dtype}")
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list of integers, got {type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (bool, float)) or not hasattr(v, "__index__"):
            raise ValueError(f"{name}[{i}] must be an integer, got {show(v)}")
        v = int(v.__index__())
        if not -(2**63) <= v < 2**63:
            raise ValueError(f"{name}[{i}] is out of range: {show(v)}")
        out.append(v)
    return out


def check_vocabulary(ids: list[int], vocab_size: int, what: str) -> None:
    """Refuses token ids (a tokenizer's output) that the model cannot embed: a tokenizer with a
    larger vocabulary than the model's would otherwise reach the embedding lookup (an
    ``IndexError`` on the CPU, a device-side assert on CUDA).

    Raises:
        ValueError: naming ``what`` and the first id outside ``0 .. vocab_size - 1``.
    """
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(
            f"{what} holds token id {outside[0]}, outside the model's vocabulary of {vocab_size} "
            f"(ids 0..{vocab_size - 1})"
        )
