"""Contextual calibration: correct a context's bias towards some labels before choosing one.

A few-shot context often makes a small model favour one label whatever the input (the last
example's label, the more frequent one, the one whose word is more common). Zhao et al.,
"Calibrate Before Use: Improving Few-Shot Performance of Language Models" (ICML 2021), estimate
that bias from *content-free* inputs, texts that carry no evidence for any label ("N/A", "",
"[MASK]"): the label probabilities the context gives them, averaged, are the prior ``p_cf``. Each
real input's probabilities ``p`` are then divided by it, label by label, and renormalised:

    q = (p / p_cf) / sum(p / p_cf)

which has the argmax of their ``softmax(diag(p_cf)^-1 p)`` (a diagonal W, no bias). A context
that gives every content-free input the same probabilities for all labels is left unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cpt.data import Template
    from cpt.model import CPTModel

CONTENT_FREE_INPUTS: tuple[str, ...] = ("N/A", "", "[MASK]")
"""The content-free texts whose label probabilities are averaged into the prior (Zhao et al.)."""


def content_free_prior(
    model: CPTModel,
    tokenizer: PreTrainedTokenizerBase,
    labels: Sequence[str],
    *,
    template: Template | None = None,
    inputs: Sequence[str] = CONTENT_FREE_INPUTS,
    **classify_kwargs: Any,
) -> torch.Tensor:
    """The context's label probabilities for content-free inputs, averaged.

    Args:
        model: the `CPTModel` whose context is calibrated.
        tokenizer: its tokenizer.
        labels: the candidate labels, in column order.
        template: the template the context was written with; the default `Template` if None.
        inputs: the content-free texts, at least one.
        **classify_kwargs: passed to `cpt.infer.classify` (``batch_size``, ``context_cache``...).

    Returns:
        (L,) float32 on the CPU, positive, summing to 1.
    """
    from cpt.infer import classify  # infer imports this module when asked to calibrate

    result = classify(model, tokenizer, list(inputs), labels, template=template, **classify_kwargs)
    return result.probabilities.mean(dim=0)


def calibrate(probabilities: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Divides each row of label probabilities by the prior and renormalises it.

    Args:
        probabilities: (..., L) label probabilities, each row summing to 1.
        prior: (L,) the content-free prior (`content_free_prior`).

    Returns:
        (..., L) calibrated probabilities, rows summing to 1, in the dtype of ``probabilities``.

    Raises:
        ValueError: if the last dimensions differ, or the prior is not positive and finite.
    """
    if prior.dim() != 1 or probabilities.shape[-1] != prior.shape[0]:
        raise ValueError(
            f"the prior has shape {tuple(prior.shape)}; expected ({probabilities.shape[-1]},), one "
            "probability per label"
        )
    if not bool(torch.isfinite(prior).all()) or not bool((prior > 0).all()):
        raise ValueError(f"the prior must be positive and finite, got {prior.tolist()}")
    # In log space: a label the context all but rules out (p ~ 1e-30) stays comparable.
    logits = probabilities.double().clamp_min(torch.finfo(torch.float64).tiny).log() - prior.double().log()
    return logits.softmax(dim=-1).to(probabilities.dtype)
