"""Choosing how long to train a context from the user's own examples: leave-one-out.

With K examples per class there is no validation set to spare, and the training loss says little:
every training sample is also in the context, so the model can copy its label from there. The
leave-one-out score asks the question a new text asks: each context example is classified with
the *other* examples as the context (its own tokens masked out of the attention, the trained
embeddings of the others kept), and the score is the mean log-probability of its true label,
normalised over the label set. It needs no data beyond the context's examples.

`LeaveOneOut` is an ``eval_fn`` for `cpt.train.train` that also remembers the context at the best
score (its ``state``, which checkpoints carry); `cpt.workflow.fit` uses it to return the best
context seen, the untrained one included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from cpt.checkpoint import Selection
from cpt.config import CODES_PER_EXAMPLE
from cpt.data import Example, Template
from cpt.infer import classify
from cpt.model import CPTModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def example_spans(model: CPTModel, num_examples: int) -> list[tuple[int, int]]:
    """Where each example of the context lies: ``[start, stop)`` positions, in context order.

    Example k holds the tokens with codes ``4k + 1 .. 4k + 4`` and the separators (code 0) that
    follow them up to the next example.

    Raises:
        ValueError: if the context does not hold ``num_examples`` examples.
    """
    codes = model.context.cpu_codes.tolist()
    starts = []
    for k in range(num_examples):
        first = next(
            (p for p, c in enumerate(codes) if CODES_PER_EXAMPLE * k < c <= CODES_PER_EXAMPLE * (k + 1)),
            None,
        )
        if first is None:
            raise ValueError(f"the context holds fewer than {num_examples} examples (none with index {k})")
        starts.append(first)
    if any(c > CODES_PER_EXAMPLE * num_examples for c in codes):
        raise ValueError(f"the context holds more than {num_examples} examples")
    return list(zip(starts, starts[1:] + [len(codes)], strict=True))


@torch.no_grad()
def held_out_log_probs(
    model: CPTModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    labels: Sequence[str],
    *,
    template: Template | None = None,
) -> list[tuple[float, str]]:
    """Each context example classified with its own tokens, and those of every other example of
    the same text, masked out of the context.

    Args: as for `leave_one_out`.

    Returns:
        For each example, in order: the log-probability of its true label (normalised over
        ``labels``) and the predicted label.

    Raises:
        ValueError: as for `leave_one_out`.
    """
    if len(examples) < 2:
        raise ValueError("leave-one-out needs at least 2 context examples")
    label_index = {label: j for j, label in enumerate(labels)}
    spans = example_spans(model, len(examples))
    visible = list(model.config.cpt_mask)
    scored = []
    for example in examples:
        mask = list(visible)
        for other, (start, stop) in zip(examples, spans, strict=True):
            if other.text == example.text:  # every copy of the text: a copy left in would give it away
                mask[start:stop] = [0] * (stop - start)
        held_out = CPTModel(model.base_model, replace(model.config, cpt_mask=mask))
        held_out.delta.data = model.delta.data  # the trained rows, shared, not copied
        result = classify(held_out, tokenizer, [example.text], labels, template=template)
        probability = float(result.probabilities[0, label_index[example.label]])
        scored.append((math.log(max(probability, 1e-30)), result.predictions[0]))
    return scored


def leave_one_out(
    model: CPTModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    labels: Sequence[str],
    *,
    template: Template | None = None,
) -> dict[str, float]:
    """Scores each context example with the other examples as the context.

    Args:
        model: a `CPTModel` whose context was built from ``examples``, in that order.
        tokenizer: its tokenizer.
        examples: the context's examples (at least 2).
        labels: the label set.
        template: the context's template; the default `Template` if None.

    Returns:
        ``{"loo_log_prob": mean log-probability of the true labels, "loo_accuracy": fraction
        classified right}``.

    Raises:
        ValueError: with fewer than 2 examples, or a context that does not hold them.
    """
    scored = held_out_log_probs(model, tokenizer, examples, labels, template=template)
    log_probs = [log_prob for log_prob, _ in scored]
    right = sum(predicted == example.label for (_, predicted), example in zip(scored, examples, strict=True))
    return {"loo_log_prob": sum(log_probs) / len(log_probs), "loo_accuracy": right / len(examples)}


class LeaveOneOut:
    """An ``eval_fn`` that scores the context by `leave_one_out` and keeps the best one.

    Call it once before training (the untrained context, step 0) and let `cpt.train.train` call
    it every ``eval_every`` steps; then `restore` puts the best context back into the model.
    Ties keep the earlier (less trained) context. What it keeps is its ``state`` (a
    `cpt.checkpoint.Selection`): pass it to `cpt.train.train` as ``selector`` too, and checkpoints
    carry it, so that a resumed run chooses as an uninterrupted one.

    Args:
        tokenizer, examples, labels, template: as for `leave_one_out`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[Example],
        labels: Sequence[str],
        template: Template | None = None,
    ) -> None:
        self.tokenizer, self.examples, self.labels, self.template = tokenizer, list(examples), list(labels), template
        self.state = Selection()

    def __call__(self, model: CPTModel) -> dict[str, float]:
        metrics = leave_one_out(model, self.tokenizer, self.examples, self.labels, template=self.template)
        score, calls = metrics["loo_log_prob"], self.state.calls
        if score > self.state.best_score:
            best = model.delta.detach().clone()
            self.state = Selection(calls + 1, best_call=calls, best_score=score, best_delta=best)
        else:
            self.state = replace(self.state, calls=calls + 1)
        return metrics

    @torch.no_grad()
    def restore(self, model: CPTModel) -> None:
        """Copies the best context seen into ``model`` (nothing if none was scored)."""
        if self.state.best_delta is not None:
            model.delta.copy_(self.state.best_delta)
