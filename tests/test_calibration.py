"""Contextual calibration (`cpt.calibration`) and ``classify(calibrate=True)``, on tiny random models.

Macro-F1 is in test_metrics.py, leave-one-out in test_selection.py, fit's selection in test_workflow.py."""

from __future__ import annotations

import pytest
import torch
from contexts import FEW_SHOT_EXAMPLES, FEW_SHOT_LABELS
from tiny_models import make_model
from tokenizers_util import make_bpe_tokenizer

from cpt import build_context
from cpt.calibration import CONTENT_FREE_INPUTS, calibrate
from cpt.data import Example, Template
from cpt.infer import classify, content_free_prior
from cpt.model import CPTModel

LABELS, EXAMPLES = FEW_SHOT_LABELS, FEW_SHOT_EXAMPLES
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
