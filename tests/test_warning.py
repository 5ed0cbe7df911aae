"""`cpt.warning`: `CPTWarning` is a `UserWarning` a program can filter by category, and what `cpt`
warns its user of comes in that category (once, where it would repeat every step)."""

from __future__ import annotations

import warnings

import pytest
from contexts import context_config, sample_batch
from tiny_models import make_model

from cpt import CPTModel
from cpt.warning import CPTWarning


def test_cpt_warnings_are_user_warnings_that_filter_by_their_category() -> None:
    assert issubclass(CPTWarning, UserWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=CPTWarning)
        warnings.warn("a slower path", CPTWarning, stacklevel=1)
        warnings.warn("another library's", UserWarning, stacklevel=1)
    assert [(w.category, str(w.message)) for w in caught] == [(UserWarning, "another library's")]
    with warnings.catch_warnings(), pytest.raises(CPTWarning, match="^a slower path$"):
        warnings.simplefilter("error", CPTWarning)
        warnings.warn("a slower path", CPTWarning, stacklevel=1)


def _without_sharing() -> CPTModel:
    """A model whose base runs `transformers`' own gradient checkpointing (it turns KV caches
    off), so context sharing falls back to the plain path."""
    base_model = make_model("llama")
    enable = getattr(base_model, "activation_checkpointing_enable", None)  # 5.24; before: gradient_...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        (enable or base_model.gradient_checkpointing_enable)()
    return CPTModel(base_model, context_config()).train()


def test_a_fallback_to_the_plain_path_warns_once_as_a_cpt_warning() -> None:
    model = _without_sharing()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            model(**sample_batch(2, seed=step)).loss.backward()
    ours = [w for w in caught if w.category is CPTWarning]
    assert len(ours) == 1
    assert str(ours[0].message).startswith("context sharing is off: ")


def test_a_program_silences_cpt_warnings_by_category() -> None:
    model = _without_sharing()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=CPTWarning)
        model(**sample_batch(2)).loss.backward()
    assert not [w for w in caught if w.category is CPTWarning]
