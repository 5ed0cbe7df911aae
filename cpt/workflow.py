"""The few-shot workflow in one call: examples in, a trained CPT model out.

With PEFT, a CPT user writes about a hundred lines before the first step (tokenizing templates
piece by piece, type masks, shifting codes, a collator, a projection hook). `fit` is that whole
path: render the examples into a context, wrap the model, train by projected AdamW, and remember
the template and label set so the adapter can classify after it is saved and loaded again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from cpt._fields import check_distinct, check_instance, check_path, check_text, check_vocabulary, show
from cpt.data import (
    CPTCollator, CPTDataset, Example, ExampleLike, Template, as_examples, as_template, build_context,
    check_distinct_labels, label_token_ids, padding_id, task_template,
)
from cpt.model import CPTModel, check_options
from cpt.train import EvalFn, TrainConfig, TrainResult, train

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CONTEXT_DEFAULTS: dict[str, Any] = dict(
    opt_weighted_loss_type="decay",  # recent examples weigh more, as in the paper's experiments
    opt_loss_decay_factor=0.95,
    # Radii at hidden size 2048 (scaled by sqrt(d / 2048)); input rows may move further than
    # template rows. PEFT's example has 0.2 / 0.1, which held the context back at lr 1e-3.
    opt_projection_epsilon=1.0,
    opt_projection_format_epsilon=0.5,
)
"""The CPT options `fit` uses unless told otherwise (cpt's recipe, docs/tuning.md; PEFT's CPT
example has epsilons 0.2 / 0.1)."""

SELECTIONS = ("leave-one-out",)
DEFAULT_SELECTION: str | None = "leave-one-out"
"""How `fit` chooses which trained context to return: ``"leave-one-out"`` scores the context
(`cpt.selection.leave_one_out`) before training and at `SELECTION_POINTS` evenly spaced steps
(or every ``eval_every`` steps when the config sets it) and keeps the best; None returns the last."""
SELECTION_POINTS = 4

SELECTION_MIN_PER_LABEL = 2
"""Distinct texts of each label that leave-one-out needs: holding one out leaves its label in
the context (`_every_label_twice`)."""

MIN_LABELS = 2
"""A classifier needs two labels: with one, every answer is that label, with probability 1."""


def task_of(template: Template, labels: Sequence[str]) -> dict[str, Any]:
    """The task description saved with an adapter: the template's fields and the label set."""
    return {"template": asdict(template), "labels": list(labels)}


def template_of(model: CPTModel) -> Template:
    """The template a model was trained with (from its task), or the default one."""
    return task_template(model.task)


def labels_of(model: CPTModel) -> list[str]:
    """The label set a model was trained with.

    Raises:
        ValueError: if the model carries no label set (e.g. loaded from a PEFT adapter).
    """
    labels = (model.task or {}).get("labels")
    if not labels:
        raise ValueError("the adapter records no label set: pass the labels explicitly")
    return list(labels)


def fit(
    base_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Iterable[ExampleLike],
    *,
    template: Template | None = None,
    train_examples: Iterable[ExampleLike] | None = None,
    labels: Sequence[str] | None = None,
    train_config: TrainConfig | None = None,
    eval_fn: EvalFn | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
    selection: str | None = DEFAULT_SELECTION,
    **context_options: Any,
) -> tuple[CPTModel, TrainResult]:
    """Builds a CPT context from labelled examples and trains it.

    Args:
        base_model: any `transformers` causal LM; frozen.
        tokenizer: its tokenizer.
        examples: the labelled examples that form the context: `Example` objects, ``(text, label)``
            pairs, or mappings with ``"text"`` and ``"label"`` keys (``datasets`` rows); a label
            is a string or an integer index into ``labels`` (a ``ClassLabel``'s names).
        template: how examples are written out; `Template()` by default.
        train_examples: what to train on; by default the context's own examples (the paper's
            few-shot setting: ICL and CPT see exactly the same labels).
        labels: the label set, in order (what integer labels index); by default the labels of
            ``examples`` in order of first appearance.
        train_config: the training hyper-parameters; `TrainConfig()` by default.
        eval_fn: called as ``eval_fn(model)`` every ``train_config.eval_every`` steps.
        checkpoint_dir: where training checkpoints go (see `cpt.train.train`).
        resume_from: a checkpoint folder to continue from (see `cpt.train.train`).
        model_kwargs: passed to `CPTModel` (``context_sharing``, ``activation_checkpointing``...).
        selection: ``"leave-one-out"``: score the context by leave-one-out over ``examples``
            (each example classified with the others as the context) before training and at
            `SELECTION_POINTS` steps, and return the best of those contexts, the untrained one
            included; it uses no data beyond ``examples``, and needs at least 2 examples of each
            label (with fewer, the last context is returned). None: return the last context. The scores
            are in ``result.eval_history`` (``loo_log_prob``, ``loo_accuracy``; step 0 first).
            A checkpoint carries the selection's state, so a resumed run returns the context an
            uninterrupted one would.
        **context_options: `CPTConfig` options (``opt_projection_epsilon``, ...), over
            `CONTEXT_DEFAULTS`.

    Returns:
        ``(model, result)``: the trained `CPTModel` (its ``task`` records template and labels)
        and the `TrainResult`.

    Raises:
        ValueError: on empty examples, a malformed example (naming its index; a text that is
            not valid Unicode included), an integer label without ``labels``, a label outside
            ``labels``, ``labels`` that is not a list of distinct non-empty strings, a label set of
            one label (the context's, when ``labels`` is not given), two labels that render to the
            same tokens (`cpt.data.check_distinct_labels`), an example with a token id outside the
            model's vocabulary (naming it), an unknown
            ``selection``, an argument of the wrong type (checked before anything is built), or
            any bad option.
    """
    if selection is not None and selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS} or None, got {show(selection)}")
    _check_options(train_config, eval_fn, checkpoint_dir, resume_from, model_kwargs)
    template = as_template(template)
    names = None if labels is None else _label_set(labels)
    context = as_examples(examples, "examples", names)
    if not context:
        raise ValueError("examples is empty: the context needs at least one labelled example")
    training = context if train_examples is None else as_examples(train_examples, "train_examples", names)
    label_set = list(dict.fromkeys(e.label for e in context)) if names is None else names
    if len(label_set) < MIN_LABELS:
        raise ValueError(f"the label set {label_set} has one label: a classifier needs at least two (pass labels=)")
    for name, items in (("examples", context), ("train_examples", training)):
        for i, example in enumerate(items):
            if example.label not in label_set:
                raise ValueError(f"{name}[{i}] has label {example.label!r}, not in the label set {label_set}")
    config = build_context(tokenizer, context, template, **{**CONTEXT_DEFAULTS, **context_options})
    check_distinct_labels(label_set, [label_token_ids(tokenizer, template, label) for label in label_set])
    model = CPTModel(base_model, config, **(model_kwargs or {}))
    model.task = task_of(template, label_set)
    dataset = CPTDataset(tokenizer, training, template)
    vocab_size = int(model.base_model.get_input_embeddings().weight.shape[0])
    for i, sample in enumerate(dataset.samples):  # refused by name here, not at some step of training
        check_vocabulary(sample.input_ids, vocab_size, f"train_examples[{i}]" if train_examples is not None else f"examples[{i}]")
    config = train_config or TrainConfig()
    selector = None
    if selection == "leave-one-out" and _every_label_twice(context):
        from cpt.selection import LeaveOneOut  # imports cpt.infer, which `import cpt` keeps lazy

        selector = LeaveOneOut(tokenizer, context, label_set, template)
        first = {"step": 0, **selector(model)}
        if config.eval_every is None:
            every = math.ceil(config.total_steps(len(dataset)) / SELECTION_POINTS)
            config = replace(config, eval_every=max(1, every))
        eval_fn = _both(selector, eval_fn)
    result = train(
        model,
        dataset,
        config,
        collator=CPTCollator(padding_id(tokenizer, vocab_size)),
        eval_fn=eval_fn,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        selector=selector,
    )
    if selector is not None:
        selector.restore(model)
        result.eval_history.insert(0, first)
        if selector.state.best_call is not None:
            step = result.eval_history[selector.state.best_call]["step"]
            logger.info("leave-one-out kept the context of step %d", step)
    return model, result


def _check_options(
    train_config: Any, eval_fn: Any, checkpoint_dir: Any, resume_from: Any, model_kwargs: Any
) -> None:
    """Refuses a `fit` option of the wrong type before anything is built."""
    if train_config is not None:
        check_instance(train_config, TrainConfig, "train_config")
    if eval_fn is not None and not callable(eval_fn):
        raise ValueError(f"eval_fn must be callable or None, got {type(eval_fn).__name__}")
    for name, path in (("checkpoint_dir", checkpoint_dir), ("resume_from", resume_from)):
        if path is not None:
            check_path(path, name)
    if model_kwargs is not None:
        check_options(check_instance(model_kwargs, dict, "model_kwargs"))


def _label_set(labels: Sequence[str]) -> list[str]:
    """``labels`` as a list, checked: distinct non-empty strings (a saved adapter needs them so)."""
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise ValueError(f"labels must be a list of strings, got {labels!r}")
    label_set = list(labels)
    for i, label in enumerate(label_set):
        if not isinstance(label, str) or not label:
            raise ValueError(f"labels[{i}] must be a non-empty string, got {label!r}")
        check_text(label, f"labels[{i}]")
    check_distinct(label_set, "labels")
    if not label_set:
        raise ValueError("labels is empty")
    return label_set


def _every_label_twice(context: Sequence[Example]) -> bool:
    """Whether leaving any one example (and its copies) out keeps its label in the context: each
    label needs two distinct texts. Without that, the held-out example's label is missing from
    what it is scored against, and the score says nothing about the trained context
    (docs/tuning.md has the measurement)."""
    texts: dict[str, set[str]] = {}
    for example in context:  # distinct texts: leave-one-out hides every copy of the held-out one
        texts.setdefault(example.label, set()).add(example.text)
    return min(len(t) for t in texts.values()) >= SELECTION_MIN_PER_LABEL


def _both(selector: EvalFn, eval_fn: EvalFn | None) -> EvalFn:
    """One eval_fn that runs the selection's, then the user's, and merges their metrics."""
    if eval_fn is None:
        return selector

    def both(model: CPTModel) -> Mapping[str, float]:
        return {**selector(model), **eval_fn(model)}

    return both
