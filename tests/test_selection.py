"""`cpt.selection`: where each example lies in the context, leave-one-out scoring, and the
`LeaveOneOut` selector that keeps the best context seen (on a tiny random model)."""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import pairwise

import pytest
import torch
from contexts import FEW_SHOT_EXAMPLES, FEW_SHOT_LABELS
from tiny_models import make_model
from tokenizers_util import make_bpe_tokenizer

from cpt import build_context
from cpt.checkpoint import Selection
from cpt.data import Template
from cpt.infer import classify
from cpt.model import CPTModel
from cpt.selection import LeaveOneOut, example_spans, held_out_log_probs, leave_one_out

LABELS, EXAMPLES = FEW_SHOT_LABELS, FEW_SHOT_EXAMPLES


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def base_model(tokenizer):  # type: ignore[no-untyped-def]
    return make_model("llama", vocab_size=len(tokenizer))


def _model(base_model, tokenizer) -> CPTModel:  # type: ignore[no-untyped-def]
    """A context of `EXAMPLES` whose trainable rows moved (so it is not just word embeddings)."""
    model = CPTModel(base_model, build_context(tokenizer, EXAMPLES, Template()))
    with torch.no_grad():
        model.delta.normal_(std=0.05)
        model.project_()
    return model



def test_example_spans_cover_the_context_in_order(base_model, tokenizer) -> None:
    model = _model(base_model, tokenizer)
    spans = example_spans(model, len(EXAMPLES))
    assert spans[0][0] == 0 and spans[-1][1] == model.num_virtual_tokens
    assert all(a[1] == b[0] for a, b in pairwise(spans))
    codes = model.context.cpu_codes.tolist()
    for k, (start, stop) in enumerate(spans):
        assert {c for c in codes[start:stop] if c} == {4 * k + 1, 4 * k + 2, 4 * k + 3, 4 * k + 4}
    with pytest.raises(ValueError, match="more than 3"):
        example_spans(model, 3)
    with pytest.raises(ValueError, match="fewer than 5"):
        example_spans(model, 5)


def test_a_held_out_example_does_not_see_its_own_tokens(base_model, tokenizer) -> None:
    model = _model(base_model, tokenizer)
    before = held_out_log_probs(model, tokenizer, EXAMPLES, LABELS)
    start, stop = example_spans(model, len(EXAMPLES))[1]
    with torch.no_grad():
        model.delta[start:stop] += 0.5  # only example 1's rows move
    after = held_out_log_probs(model, tokenizer, EXAMPLES, LABELS)
    assert after[1][0] == pytest.approx(before[1][0], abs=1e-5)  # it does not see itself
    assert any(abs(a[0] - b[0]) > 1e-4 for k, (a, b) in enumerate(zip(after, before)) if k != 1)


def test_leave_one_out_means_the_held_out_scores(base_model, tokenizer) -> None:
    model = _model(base_model, tokenizer)
    scored = held_out_log_probs(model, tokenizer, EXAMPLES, LABELS)
    metrics = leave_one_out(model, tokenizer, EXAMPLES, LABELS)
    assert metrics["loo_log_prob"] == pytest.approx(sum(s for s, _ in scored) / 4)
    assert metrics["loo_accuracy"] == sum(p == e.label for (_, p), e in zip(scored, EXAMPLES)) / 4
    assert all(s <= 0 for s, _ in scored)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out(model, tokenizer, EXAMPLES[:1], LABELS)




def test_a_held_out_score_is_the_log_probability_of_its_label_with_its_span_masked(base_model, tokenizer) -> None:
    model = _model(base_model, tokenizer)
    scored = held_out_log_probs(model, tokenizer, EXAMPLES, LABELS)
    spans = example_spans(model, len(EXAMPLES))
    for k, example in enumerate(EXAMPLES):
        start, stop = spans[k]
        mask = [0 if start <= p < stop else m for p, m in enumerate(model.config.cpt_mask)]
        masked = CPTModel(base_model, replace(model.config, cpt_mask=mask))
        with torch.no_grad():
            masked.delta.copy_(model.delta)
        result = classify(masked, tokenizer, [example.text], LABELS)
        expected = math.log(float(result.probabilities[0, LABELS.index(example.label)]))
        assert scored[k][0] == pytest.approx(expected, abs=1e-6), k
        assert scored[k][1] == result.predictions[0]


def test_scoring_leaves_the_model_as_it_was(base_model, tokenizer) -> None:
    model = _model(base_model, tokenizer)
    delta, mask = model.delta.detach().clone(), list(model.config.cpt_mask)
    leave_one_out(model, tokenizer, EXAMPLES, LABELS)
    assert torch.equal(model.delta.detach(), delta)
    assert model.config.cpt_mask == mask and model.context.fully_visible


def test_the_selector_keeps_the_first_of_equal_scores_and_restores_it(base_model, tokenizer) -> None:
    model = _model(base_model, tokenizer)
    selector = LeaveOneOut(tokenizer, EXAMPLES, LABELS)
    first = selector(model)
    kept = model.delta.detach().clone()
    assert selector.state.calls == 1 and selector.state.best_call == 0
    assert selector.state.best_score == first["loo_log_prob"]
    assert torch.equal(selector.state.best_delta, kept)
    assert selector(model) == first  # the same context again: a tie keeps the earlier call
    assert selector.state.calls == 2 and selector.state.best_call == 0
    with torch.no_grad():
        model.delta.zero_()
    selector.restore(model)
    assert torch.equal(model.delta.detach(), kept)


def test_the_selector_keeps_a_better_score_and_only_a_better_one(base_model, tokenizer) -> None:
    model = _model(base_model, tokenizer)
    selector = LeaveOneOut(tokenizer, EXAMPLES, LABELS)
    selector.state = Selection(calls=3, best_call=1, best_score=0.0, best_delta=torch.zeros_like(model.delta))
    selector(model)  # log-probabilities are below 0: not better than the kept score
    assert (selector.state.calls, selector.state.best_call, selector.state.best_score) == (4, 1, 0.0)
    selector.state = replace(selector.state, best_score=-math.inf)
    metrics = selector(model)
    assert (selector.state.calls, selector.state.best_call) == (5, 4)
    assert selector.state.best_score == metrics["loo_log_prob"]
    assert torch.equal(selector.state.best_delta, model.delta.detach())


def test_restore_without_a_scored_context_changes_nothing(base_model, tokenizer) -> None:
    model = _model(base_model, tokenizer)
    delta = model.delta.detach().clone()
    LeaveOneOut(tokenizer, EXAMPLES, LABELS).restore(model)
    assert torch.equal(model.delta.detach(), delta)
