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

import torch

CONTENT_FREE_INPUTS: tuple[str, ...] = ("N/A", "", "[MASK]")
"""The content-free texts whose label probabilities are averaged into the prior (Zhao et al.)."""


def calibrate(probabilities: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Divides each row of label probabilities by the prior and renormalises it.

    Args:
        probabilities: (..., L) label probabilities, each row summing to 1.
        prior: (L,) the content-free prior (`cpt.infer.content_free_prior`).

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
