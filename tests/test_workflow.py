"""`cpt.workflow`: `fit` takes examples as users hold them (pairs, `Example`s, `datasets` rows
with string labels or with integer labels and the label names, a ``ClassLabel``), `classify` takes
the same rows, and ``selection="leave-one-out"`` returns the best context seen. The task an adapter
records (`task_of`, `template_of`, `labels_of`) is checked here too."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from contexts import FEW_SHOT_EXAMPLES, FEW_SHOT_LABELS
from tiny_models import make_model
from tokenizers_util import make_bpe_tokenizer

from cpt import Example, Template, TrainConfig, classify, fit
from cpt.selection import leave_one_out
from cpt.workflow import labels_of, task_of, template_of

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


# ---------------------------------------------------------------------- fit's selection

LABELS, EXAMPLES = FEW_SHOT_LABELS, FEW_SHOT_EXAMPLES


@pytest.fixture(scope="module")
def base_model(tokenizer):  # type: ignore[no-untyped-def]
    return make_model("llama", vocab_size=len(tokenizer))


def test_fit_keeps_the_context_with_the_best_leave_one_out_score(base_model, tokenizer) -> None:
    config = TrainConfig(learning_rate=3e-2, max_steps=8, progress=False)
    model, result = fit(base_model, tokenizer, EXAMPLES, labels=LABELS, train_config=config,
                        selection="leave-one-out", opt_projection_epsilon=4.0)
    history = result.eval_history
    assert [h["step"] for h in history] == [0, 2, 4, 6, 8]  # the untrained context, then 4 points
    best = max(h["loo_log_prob"] for h in history)
    assert leave_one_out(model, tokenizer, EXAMPLES, LABELS)["loo_log_prob"] == pytest.approx(best, abs=1e-5)
    if history[0]["loo_log_prob"] == best:
        assert torch.count_nonzero(model.delta) == 0


def test_fit_without_selection_returns_the_last_context(base_model, tokenizer) -> None:
    config = TrainConfig(learning_rate=3e-2, max_steps=4, progress=False)
    _, result = fit(base_model, tokenizer, EXAMPLES, labels=LABELS, train_config=config, selection=None)
    assert result.eval_history == []
    with pytest.raises(ValueError, match="selection must be one of"):
        fit(base_model, tokenizer, EXAMPLES, labels=LABELS, train_config=config, selection="best")


def test_fit_skips_selection_when_a_label_has_one_example(base_model, tokenizer) -> None:
    # Leaving out the only "negative" example would score it against a context without its label.
    config = TrainConfig(learning_rate=3e-2, max_steps=4, progress=False)
    examples = [EXAMPLES[0], EXAMPLES[1], EXAMPLES[2]]
    _, result = fit(base_model, tokenizer, examples, labels=LABELS, train_config=config, selection="leave-one-out")
    assert result.eval_history == []


def test_fit_selection_runs_beside_the_users_eval_fn(base_model, tokenizer) -> None:
    config = TrainConfig(learning_rate=1e-2, max_steps=4, eval_every=2, progress=False)
    _, result = fit(base_model, tokenizer, EXAMPLES, labels=LABELS, train_config=config,
                    selection="leave-one-out", eval_fn=lambda m: {"mine": 1.0})
    assert [h["step"] for h in result.eval_history] == [0, 2, 4]
    assert all(h["mine"] == 1.0 for h in result.eval_history[1:]) and "mine" not in result.eval_history[0]
    assert math.isfinite(result.eval_history[0]["loo_log_prob"])


# ---------------------------------------------------------------------- the task an adapter records


def test_the_task_records_the_template_and_the_labels(tokenizer) -> None:
    template = Template(input_template="Q: {}", output_template="A: {}")
    model, _ = _fit(tokenizer, PAIRS, labels=NAMES, template=template)
    assert model.task == task_of(template, NAMES)
    assert template_of(model) == template
    assert labels_of(model) == NAMES


def test_a_model_without_a_task_has_the_default_template_and_no_labels(tokenizer) -> None:
    model, _ = _fit(tokenizer, PAIRS, labels=NAMES)
    model.task = None  # as a model loaded from a PEFT adapter
    assert template_of(model) == Template()
    with pytest.raises(ValueError, match="the adapter records no label set: pass the labels explicitly"):
        labels_of(model)
