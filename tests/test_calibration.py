"""Contextual calibration, macro-F1, leave-one-out and fit's selection, on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import make_model
from tokenizers_util import make_bpe_tokenizer

from cpt import TrainConfig, build_context, fit
from cpt.calibration import CONTENT_FREE_INPUTS, calibrate
from cpt.infer import content_free_prior
from cpt.data import Example, Template
from cpt.infer import classify
from cpt.metrics import accuracy, macro_f1
from cpt.model import CPTModel
from cpt.selection import example_spans, held_out_log_probs, leave_one_out

LABELS = ["negative", "positive"]
EXAMPLES = [
    Example("a great film", "positive"),
    Example("an awful story", "negative"),
    Example("a fine movie", "positive"),
    Example("boring and long", "negative"),
]
TEXTS = ["the film", "a story", "long movie", "great"]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def base_model(tokenizer):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return make_model("llama", vocab_size=len(tokenizer))


def _model(base_model, tokenizer, examples=EXAMPLES, **options) -> CPTModel:  # type: ignore[no-untyped-def]
    model = CPTModel(base_model, build_context(tokenizer, examples, Template(), **options))
    with torch.no_grad():
        model.delta.normal_(std=0.05)  # a context that is not just word embeddings
        model.project_()
    return model


# ---------------------------------------------------------------------- calibration math


def test_calibrate_divides_by_the_prior_and_renormalises() -> None:
    probabilities = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    prior = torch.tensor([0.75, 0.25])
    calibrated = calibrate(probabilities, prior)
    # [0.8 / 0.75, 0.2 / 0.25] = [1.0667, 0.8] -> [0.5714, 0.4286]; [0.8, 1.6] -> [1/3, 2/3]
    assert torch.allclose(calibrated, torch.tensor([[0.8 / 0.75 / (0.8 / 0.75 + 0.8), 0.8 / (0.8 / 0.75 + 0.8)],
                                                    [1 / 3, 2 / 3]]), atol=1e-6)
    assert calibrated.dtype == probabilities.dtype


def test_a_uniform_prior_changes_nothing() -> None:
    probabilities = torch.tensor([[0.1, 0.3, 0.6]])
    assert torch.allclose(calibrate(probabilities, torch.full((3,), 1 / 3)), probabilities, atol=1e-7)


def test_calibrate_keeps_labels_the_context_all_but_rules_out_comparable() -> None:
    probabilities = torch.tensor([[1.0, 0.0]])  # underflowed
    prior = torch.tensor([1.0 - 1e-12, 1e-12])
    assert torch.isfinite(calibrate(probabilities, prior)).all()


@pytest.mark.parametrize("prior", [torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.5, float("nan")]),
                                   torch.tensor([[0.5, 0.5]]), torch.tensor([1.0])])
def test_calibrate_refuses_a_bad_prior(prior: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="prior"):
        calibrate(torch.tensor([[0.5, 0.5]]), prior)


# ---------------------------------------------------------------------- classify(calibrate=True)


def test_classify_calibrated_is_the_plain_result_divided_by_the_content_free_prior(base_model, tokenizer) -> None:
    model = _model(base_model, tokenizer)
    plain = classify(model, tokenizer, TEXTS, LABELS)
    calibrated = classify(model, tokenizer, TEXTS, LABELS, calibrate=True)
    free = classify(model, tokenizer, list(CONTENT_FREE_INPUTS), LABELS)
    assert plain.prior is None
    assert torch.equal(calibrated.log_likelihoods, plain.log_likelihoods)  # scores stay raw
    assert torch.allclose(calibrated.prior, free.probabilities.mean(dim=0))
    assert torch.allclose(content_free_prior(model, tokenizer, LABELS), calibrated.prior)
    expected = plain.probabilities / calibrated.prior
    expected = expected / expected.sum(dim=1, keepdim=True)
    assert torch.allclose(calibrated.probabilities, expected, atol=1e-6)
    assert calibrated.predictions == [LABELS[j] for j in expected.argmax(dim=1).tolist()]


def test_content_free_inputs_come_out_about_even_after_calibration(base_model, tokenizer) -> None:
    # A context of one label only, which a plain classifier tends to follow.
    skewed = [Example(t, "positive") for t in ("a great film", "a fine movie", "great story")]
    model = _model(base_model, tokenizer, skewed)
    texts = [f"{w} {v}" for w in ("film", "story", "movie", "long") for v in ("great", "awful", "fine")]
    calibrated = classify(model, tokenizer, texts, LABELS, calibrate=True)
    # by construction, the content-free inputs' mean probability is 1/2 for each label after it
    free = calibrate(classify(model, tokenizer, list(CONTENT_FREE_INPUTS), LABELS).probabilities, calibrated.prior)
    assert free.mean(dim=0).tolist() == pytest.approx([0.5, 0.5], abs=0.1)


# ---------------------------------------------------------------------- metrics


def test_macro_f1_averages_each_labels_f1() -> None:
    truths = ["a", "a", "a", "b"]
    predictions = ["a", "a", "b", "b"]
    # a: precision 1, recall 2/3 -> 0.8; b: precision 1/2, recall 1 -> 2/3
    assert macro_f1(predictions, truths) == pytest.approx((0.8 + 2 / 3) / 2)
    assert accuracy(predictions, truths) == 0.75


def test_macro_f1_punishes_predicting_one_label() -> None:
    truths = ["a"] * 9 + ["b"]
    predictions = ["a"] * 10
    assert accuracy(predictions, truths) == 0.9
    assert macro_f1(predictions, truths, ["a", "b"]) == pytest.approx((18 / 19 + 0) / 2)
    assert macro_f1(predictions, truths, ["a", "b", "c"]) == pytest.approx((18 / 19 + 0) / 2)  # c: absent


def test_metrics_refuse_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1"):
        macro_f1(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


# ---------------------------------------------------------------------- leave-one-out


def test_example_spans_cover_the_context_in_order(base_model, tokenizer) -> None:
    model = _model(base_model, tokenizer)
    spans = example_spans(model, len(EXAMPLES))
    assert spans[0][0] == 0 and spans[-1][1] == model.num_virtual_tokens
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
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


# ---------------------------------------------------------------------- fit's selection


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
