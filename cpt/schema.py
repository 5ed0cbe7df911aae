"""The shape of the JSON files cpt reads back, declared, and the one validator that checks it.

A schema is a tree of kinds: `Int`, `Number`, `Text`, `Hex`, `Choice` (`BOOL`, `NULL`),
`Either` (`Nullable`), `Items` (a list of one kind), `Tuple` (a list of fixed length),
`Record` (an object of named fields) and `Built` (an object a class builds and checks itself).
`validate` walks a loaded JSON value against one and raises a single ValueError naming the file
and the field's path::

    .../cpt_config.json: field 'task.labels[2]' must be a non-empty string, got 3

Kinds are strict the way JSON files must be read: a bool is not an integer, numbers are finite
(so no NaN, and no integer too large for a float), texts are valid Unicode. Checks that relate
two fields (a step count and the length of a list) are left to the reader of the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpt._fields import is_finite, is_int, show, text_problem

JSON_TYPES = (type(None), bool, int, float, str, list, dict)
"""The Python types `json.loads` returns; `json_type` tells which one a value is."""


def json_type(value: Any) -> type:
    """The JSON type of ``value``: ``bool`` apart from ``int`` (``object`` for none of them)."""
    return next((t for t in JSON_TYPES if type(value) is t), object)


class Invalid(Exception):
    """A field that breaks its kind: raised inside `validate`, which turns it into a ValueError."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path, self.problem = path, problem


def _wrong(kind: Kind, value: Any, path: str) -> Invalid:
    return Invalid(path, f" must be {kind.describe()}, got {show(value)}")


def field_path(path: str, key: str | int) -> str:
    """``path`` and one step further: ``a.b``, ``a[2]``, or ``a["x/y.json"]`` for a key that is no name."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not (key.isidentifier() or key.isdigit()):
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key


class Kind:
    """What a field may hold: `check` raises `Invalid` naming the field, `describe` says it in words."""

    types: tuple[type, ...] = ()  # the JSON types this kind can take (`Either` picks by them)

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, value: Any, path: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class _Any(Kind):
    types = JSON_TYPES

    def describe(self) -> str:
        return "any value"

    def check(self, value: Any, path: str) -> None:
        pass


ANY = _Any()


@dataclass(frozen=True)
class Int(Kind):
    """An integer (not a bool) in ``min .. max``, either end open when None."""

    min: int | None = None
    max: int | None = None
    types = (int,)

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer in {self.min}..{self.max}"
        return "an integer" + (f" >= {self.min}" if self.min is not None else "")

    def check(self, value: Any, path: str) -> None:
        low, high = self.min, self.max
        if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
            raise _wrong(self, value, path)


@dataclass(frozen=True)
class Number(Kind):
    """A finite int or float (not a bool), ``>= min`` and ``< below`` where given."""

    min: float | None = None
    below: float | None = None
    types = (int, float)

    def describe(self) -> str:
        low = "" if self.min is None else f" >= {self.min:g}"
        return "a finite number" + low + ("" if self.below is None else f" and < {self.below:g}")

    def check(self, value: Any, path: str) -> None:
        if not is_finite(value) or (self.min is not None and value < self.min) or (
            self.below is not None and value >= self.below
        ):
            raise _wrong(self, value, path)


class _Sized(Kind):
    """A string or a list, which a field may require to be non-empty (its ``non_empty``)."""

    non_empty: bool
    noun: str

    def describe(self) -> str:
        return f"a non-empty {self.noun}" if self.non_empty else f"a {self.noun}"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, self.types) or (self.non_empty and not value):
            raise _wrong(self, value, path)


@dataclass(frozen=True)
class Text(_Sized):
    """A string of valid Unicode (`cpt._fields.text_problem`), non-empty if asked."""

    non_empty: bool = False
    noun = "string"
    types = (str,)

    def check(self, value: Any, path: str) -> None:
        super().check(value, path)
        problem = text_problem(value)
        if problem is not None:
            raise Invalid(path, f" {problem}")


@dataclass(frozen=True)
class Hex(Kind):
    """A string of exactly ``digits`` lowercase hex digits (a checksum)."""

    digits: int
    types = (str,)

    def describe(self) -> str:
        return f"{self.digits} hex digits"

    def check(self, value: Any, path: str) -> None:
        if not (isinstance(value, str) and len(value) == self.digits and set(value) <= set("0123456789abcdef")):
            raise _wrong(self, value, path)


class Choice(Kind):
    """One of the given JSON values, of the same type too (``true`` is not ``1``)."""

    def __init__(self, *values: Any) -> None:
        self.values = values
        self.types = tuple(dict.fromkeys(json_type(v) for v in values))

    def describe(self) -> str:
        return " or ".join(json.dumps(v) for v in self.values)

    def check(self, value: Any, path: str) -> None:
        if not any(json_type(value) is json_type(v) and value == v for v in self.values):
            raise _wrong(self, value, path)


SHA256_HEX = Hex(2 * hashlib.sha256().digest_size)
"""A SHA-256 digest as cpt's files record it: 64 lowercase hex digits."""

BOOL = Choice(True, False)
NULL = Choice(None)


class Either(Kind):
    """What one of ``kinds`` takes. A list or object is checked against the first kind of its
    type, so a problem inside it is named where it is."""

    def __init__(self, *kinds: Kind) -> None:
        self.kinds = kinds
        self.types = tuple(dict.fromkeys(t for k in kinds for t in k.types))

    def describe(self) -> str:
        return " or ".join(k.describe() for k in self.kinds)

    def check(self, value: Any, path: str) -> None:
        candidates = [k for k in self.kinds if json_type(value) in k.types]
        first: Invalid | None = None
        for kind in candidates:
            try:
                kind.check(value, path)
            except Invalid as refusal:
                first = first or refusal
            else:
                return
        if first is not None and isinstance(value, (list, dict)):
            raise first
        raise _wrong(self, value, path)


def Nullable(kind: Kind) -> Either:
    """``null`` or what ``kind`` takes."""
    return Either(NULL, kind)


@dataclass(frozen=True)
class Items(_Sized):
    """A list of items of one kind, non-empty if asked, no two equal if ``unique``."""

    item: Kind
    non_empty: bool = False
    unique: bool = False
    noun = "list"
    types = (list,)

    def check(self, value: Any, path: str) -> None:
        super().check(value, path)
        for i, item in enumerate(value):
            self.item.check(item, field_path(path, i))
        if self.unique:
            seen: set[str] = set()
            for item in value:
                key = json.dumps(item, sort_keys=True)
                if key in seen:
                    raise Invalid(path, f" holds {show(item)} twice")
                seen.add(key)


class Tuple(Kind):
    """A list of exactly as many items as ``kinds``, each of its own kind."""

    types = (list,)

    def __init__(self, *kinds: Kind) -> None:
        self.kinds = kinds

    def describe(self) -> str:
        return f"a list of {len(self.kinds)}"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, list) or len(value) != len(self.kinds):
            raise _wrong(self, value, path)
        for i, (item, kind) in enumerate(zip(value, self.kinds)):
            kind.check(item, field_path(path, i))


@dataclass(frozen=True)
class Record(Kind):
    """An object holding ``fields`` (those in ``optional`` may be absent); other keys hold
    ``extra`` values, or are refused when ``extra`` is None."""

    fields: Mapping[str, Kind]
    optional: frozenset[str] = field(default_factory=frozenset)
    extra: Kind | None = None
    types = (dict,)

    def describe(self) -> str:
        return "an object"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _wrong(self, value, path)
        missing = [k for k in self.fields if k not in value and k not in self.optional]
        if missing:
            raise Invalid(field_path(path, missing[0]), " is missing")
        unknown = sorted(k for k in value if k not in self.fields)
        if unknown and self.extra is None:
            raise Invalid(path, f" has unknown keys {show(unknown)}")
        for key, kind in self.fields.items():
            if key in value:
                kind.check(value[key], field_path(path, key))
        for key in unknown:
            self.extra.check(value[key], field_path(path, key))  # type: ignore[union-attr]


@dataclass(frozen=True)
class Built(Kind):
    """An object of ``shape`` that ``build`` turns into an object of the library (a config, a
    template), which checks its own fields: its ValueError or TypeError is the refusal."""

    build: Callable[[dict[str, Any]], Any]
    shape: Record = field(default_factory=lambda: Record({}, extra=ANY))
    types = (dict,)

    def describe(self) -> str:
        return "an object"

    def check(self, value: Any, path: str) -> None:
        self.shape.check(value, path)
        try:
            self.build(value)
        except (ValueError, TypeError) as error:
            raise Invalid(path, f": {error}") from None


def validate(value: Any, kind: Kind, where: str | Path, path: str = "") -> None:
    """Checks a value read from JSON against its declared kind.

    Args:
        value: what ``json.loads`` (`cpt._io.strict_json`) returned, or a part of it.
        kind: its schema.
        where: the file, for the message.
        path: the field ``value`` is, for the message (``""``: the whole file).

    Raises:
        ValueError: ``<where>: field '<path>' <problem>`` for the first field that breaks its kind
            (``<where> <problem>`` for the whole value).
    """
    try:
        kind.check(value, path)
    except Invalid as refusal:
        named = f": field '{refusal.path}'" if refusal.path else ""
        raise ValueError(f"{where}{named}{refusal.problem}") from None


def check_header(meta: dict[str, Any], where: Path, kind: str, newest: int) -> int:
    """Checks a file's ``format`` is ``kind`` and its ``format_version`` one this cpt reads.

    Returns:
        The format version (older versions are the caller's to refuse or read).

    Raises:
        ValueError: naming the file, the field and the value; a newer version asks for an
            upgrade.
    """
    validate(meta, Record({"format": Choice(kind), "format_version": Int(min=1)}, extra=ANY), where)
    version = meta["format_version"]
    if version > newest:
        raise ValueError(f"{where.parent} was written by a newer cpt (format version {version}); upgrade cpt")
    return version


__all__ = [
    "ANY",
    "BOOL",
    "NULL",
    "SHA256_HEX",
    "Built",
    "Choice",
    "Either",
    "Hex",
    "Int",
    "Items",
    "Kind",
    "Nullable",
    "Number",
    "Record",
    "Text",
    "Tuple",
    "check_header",
    "field_path",
    "json_type",
    "validate",
]
