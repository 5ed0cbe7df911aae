"""`cpt._fields`: the type and value checks that every reader of files and arguments shares. A
bool is never a number, a string never a sequence, nothing is converted quietly, and each refusal
is one ValueError naming the argument (or file and field) and the value."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cpt._fields import (
    MAX_SEED,
    as_list,
    check_bool,
    check_instance,
    check_path,
    check_seed,
    check_text,
    check_vocabulary,
    int_list,
    is_finite,
    is_int,
    is_number,
    show,
    text_problem,
)


@pytest.mark.parametrize(
    ("value", "integer", "number", "finite"),
    [
        (3, True, True, True),
        (-(10**400), True, True, False),  # beyond float's range
        (2.5, False, True, True),
        (math.nan, False, True, False),
        (-math.inf, False, True, False),
        (True, False, False, False),  # JSON true is not a count
        ("3", False, False, False),
        (None, False, False, False),
    ],
)
def test_numbers_are_ints_and_floats_never_bools(value, integer: bool, number: bool, finite: bool) -> None:
    assert (is_int(value), is_number(value), is_finite(value)) == (integer, number, finite)


def test_seeds_are_the_integers_torch_generators_take() -> None:
    assert MAX_SEED == 2**64 - 1
    for seed in (0, 42, MAX_SEED):
        assert check_seed("seed", seed) == seed
        torch.Generator().manual_seed(seed)  # which torch takes
    for bad in (-1, MAX_SEED + 1, 1.0, True, "7", None):
        with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, 2\*\*64 - 1\], got "):
            check_seed("seed", bad)


def test_show_cuts_long_values_and_names_unprintable_integers() -> None:
    assert show("abc") == "'abc'"
    long = show("x" * 200)
    assert len(long) == 80 and long.endswith("...")
    assert show(10**5000) == "an integer of about 5000 digits"
    assert show([10**5000]) == "a list holding an integer too long to print"


def test_texts_are_strings_that_encode_as_utf8() -> None:
    assert text_problem("une phrase, déjà") is None
    assert check_text("ok", "text") == "ok"
    assert text_problem(b"bytes") == "must be a string, got b'bytes'"
    with pytest.raises(ValueError, match=r"^labels\[1\] is not valid Unicode: a lone surrogate '\\udcff' at character 2"):
        check_text("ab\udcff", "labels[1]")
    with pytest.raises(ValueError, match=r"^text must be a string, got 3$"):
        check_text(3, "text")


def test_flags_are_true_or_false_only() -> None:
    assert check_bool(True, "progress") is True and check_bool(False, "progress") is False
    for bad in (1, 0, "no", None):
        with pytest.raises(ValueError, match=r"^progress must be True or False, got "):
            check_bool(bad, "progress")


def test_paths_are_non_empty_strings_or_path_likes_without_nul(tmp_path: Path) -> None:
    assert check_path(tmp_path, "path") == tmp_path
    assert check_path("adapter", "path") == "adapter"
    for bad in ("", 3, b"adapter", None):
        with pytest.raises(ValueError, match=r"^path must be a non-empty path \(a str or os\.PathLike\), got "):
            check_path(bad, "path")
    with pytest.raises(ValueError, match=r"^path holds a NUL character, which no file name can"):
        check_path("ad\0apter", "path")
    with pytest.raises(ValueError, match=r"^path is not valid Unicode"):
        check_path(Path("ad\udcffapter"), "path")


def test_as_list_takes_iterables_but_not_strings_or_mappings() -> None:
    assert as_list(("a", "b"), "texts", "strings") == ["a", "b"]
    assert as_list((t for t in "ab"), "texts", "strings") == ["a", "b"]
    with pytest.raises(ValueError, match=r"^texts must be a sequence of strings, got the string 'ab'$"):
        as_list("ab", "texts", "strings")
    with pytest.raises(ValueError, match=r"^texts must be a sequence of strings, got dict$"):
        as_list({"a": 1}, "texts", "strings")
    with pytest.raises(ValueError, match=r"^texts must be a sequence of strings, got int$"):
        as_list(3, "texts", "strings")
    with pytest.raises(ValueError, match=r"^texts must be a sequence of strings, got Tensor \("):
        as_list(torch.tensor(3), "texts", "strings")  # iterable by type, not by value


def test_check_instance_names_every_accepted_type() -> None:
    assert check_instance(3, int, "steps") == 3
    with pytest.raises(ValueError, match=r"^steps must be a int, got str$"):
        check_instance("3", int, "steps")
    with pytest.raises(ValueError, match=r"^steps must be a int or float, got NoneType$"):
        check_instance(None, (int, float), "steps")


def test_int_list_takes_integers_and_refuses_to_convert_anything_else() -> None:
    assert int_list("ids", [1, np.int64(2), 3]) == [1, 2, 3]
    assert int_list("ids", (4, 5)) == [4, 5]
    assert int_list("ids", torch.tensor([6, 7], dtype=torch.int32)) == [6, 7]
    with pytest.raises(ValueError, match=r"^ids must be a 1-D integer tensor, got 2-D torch\.int64$"):
        int_list("ids", torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^ids must be a 1-D integer tensor, got 1-D torch\.bool$"):
        int_list("ids", torch.tensor([True]))
    with pytest.raises(ValueError, match=r"^ids must be a list of integers, got set$"):
        int_list("ids", {1, 2})
    for bad, shown in ((True, "True"), (1.0, "1.0"), ("1", "'1'")):
        with pytest.raises(ValueError, match=rf"^ids\[1\] must be an integer, got {shown}$"):
            int_list("ids", [0, bad])
    with pytest.raises(ValueError, match=r"^ids\[0\] is out of range: 9223372036854775808$"):
        int_list("ids", [2**63])
    assert int_list("ids", [-(2**63), 2**63 - 1]) == [-(2**63), 2**63 - 1]


def test_check_vocabulary_names_the_first_id_the_model_cannot_embed() -> None:
    check_vocabulary([0, 5, 95], 96, "examples[0]")
    with pytest.raises(ValueError, match=r"^examples\[2\] holds token id 96, outside the model's vocabulary of 96 "
                                         r"\(ids 0\.\.95\)$"):
        check_vocabulary([3, 96, -1], 96, "examples[2]")
    with pytest.raises(ValueError, match=r"holds token id -1, outside"):
        check_vocabulary([-1], 96, "examples[2]")
