"""`fit` and `classify` take examples as users hold them: pairs, `Example`s, `datasets` rows with
string labels or with integer labels and the label names (a ``ClassLabel``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import make_model
from tokenizers_util import make_bpe_tokenizer

from cpt import Example, TrainConfig, classify, fit

NAMES = ["negative", "positive"]
PAIRS = [("a fine story", "positive"), ("an awful film", "negative"), ("the actors were good", "positive")]
CONFIG = TrainConfig(epochs=2, learning_rate=1e-2, progress=False)


class Rows:
    """What a ``datasets.Dataset`` looks like to `fit`: a sized iterable of dict rows."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.rows)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return make_bpe_tokenizer()


def _fit(tokenizer, examples, **kwargs):  # type: ignore[no-untyped-def]
    return fit(make_model("llama", vocab_size=len(tokenizer)), tokenizer, examples, train_config=CONFIG, **kwargs)


@pytest.mark.parametrize("form", ["examples", "string rows", "ClassLabel rows", "numpy labels"])
def test_every_form_trains_the_same_context(tokenizer, form: str) -> None:
    reference, _ = _fit(tokenizer, PAIRS, labels=NAMES)
    if form == "examples":
        examples, names = [Example(t, l) for t, l in PAIRS], NAMES
    elif form == "string rows":
        examples, names = Rows([{"text": t, "label": l, "idx": i} for i, (t, l) in enumerate(PAIRS)]), NAMES
    elif form == "ClassLabel rows":
        examples, names = Rows([{"text": t, "label": NAMES.index(l)} for t, l in PAIRS]), NAMES
    else:
        examples, names = [(t, np.int64(NAMES.index(l))) for t, l in PAIRS], tuple(NAMES)
    model, _ = _fit(tokenizer, examples, labels=names)
    assert model.task == reference.task
    assert torch.equal(model.delta, reference.delta)


def test_classify_takes_rows(tokenizer) -> None:
    model, _ = _fit(tokenizer, PAIRS, labels=NAMES)
    texts = ["a fine story", "boring and too long"]
    plain = classify(model, tokenizer, texts, NAMES)
    rows = classify(model, tokenizer, [{"text": texts[0], "label": 1}, Example(texts[1], "negative")], NAMES)
    assert rows.predictions == plain.predictions
    assert torch.equal(rows.log_likelihoods, plain.log_likelihoods)


@pytest.mark.parametrize("examples, labels, message", [
    ([{"text": "a"}], NAMES, r"example at index 0 needs the keys 'text' and 'label', lacks \['label'\]"),
    ([{"label": "positive"}], None, r"example at index 0 needs the keys 'text' and 'label', lacks \['text'\]"),
    ([("a", 1)], None, r"example at index 0 has the integer label 1: pass the label names"),
    ([("a", 0), ("b", 2)], NAMES, r"example at index 1 has label index 2, outside the 2 label names"),
    ([("a", -1)], NAMES, r"example at index 0 has label index -1"),
    ([("a", True)], NAMES, r"example at index 0 must have string text and label"),
    ([{"text": 3, "label": "positive"}], None, r"example at index 0 must have string text and label"),
    (["just text"], None, r"example at index 0 must be an Example, a \(text, label\) pair or a mapping"),
])
def test_malformed_rows_are_named(tokenizer, examples, labels, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _fit(tokenizer, examples, labels=labels)


def test_train_examples_take_the_same_forms(tokenizer) -> None:
    reference, _ = _fit(tokenizer, PAIRS[:2], train_examples=PAIRS, labels=NAMES)
    rows = [{"text": t, "label": NAMES.index(l)} for t, l in PAIRS]
    model, _ = _fit(tokenizer, rows[:2], train_examples=rows, labels=NAMES)
    assert torch.equal(model.delta, reference.delta)
    with pytest.raises(ValueError, match="example at index 2 has label index 7"):
        _fit(tokenizer, PAIRS, train_examples=[*rows[:2], {"text": "x", "label": 7}], labels=NAMES)
