"""The few-shot workflow in one call: examples in, a trained CPT model out.

With PEFT, a CPT user writes about a hundred lines before the first step (tokenizing templates
piece by piece, type masks, shifting codes, a collator, a projection hook). `fit` is that whole
path: render the examples into a context, wrap the model, train by projected AdamW, and remember
the template and label set so the adapter can classify after it is saved and loaded again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from cpt.data import CPTCollator, CPTDataset, ExampleLike, Template, as_example, build_context
from cpt.model import CPTModel
from cpt.train import EvalFn, TrainConfig, TrainResult, train

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONTEXT_DEFAULTS: dict[str, Any] = dict(
    opt_weighted_loss_type="decay",  # recent examples weigh more, as in the paper's experiments
    opt_loss_decay_factor=0.95,
    opt_projection_epsilon=0.2,  # input rows may move further than template rows
    opt_projection_format_epsilon=0.1,
)
"""The CPT options `fit` uses unless told otherwise (those of PEFT's CPT example)."""


def task_of(template: Template, labels: Sequence[str]) -> dict[str, Any]:
    """The task description saved with an adapter: the template's fields and the label set."""
    return {"template": asdict(template), "labels": list(labels)}


def template_of(model: CPTModel) -> Template:
    """The template a model was trained with (from its task), or the default one."""
    task = model.task or {}
    return Template(**task["template"]) if "template" in task else Template()


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
        **context_options: `CPTConfig` options (``opt_projection_epsilon``, ...), over
            `CONTEXT_DEFAULTS`.

    Returns:
        ``(model, result)``: the trained `CPTModel` (its ``task`` records template and labels)
        and the `TrainResult`.

    Raises:
        ValueError: on empty examples, a malformed example (naming its index), an integer label
            without ``labels``, a label outside ``labels``, or any bad option.
    """
    template = template or Template()
    names = None if labels is None else list(labels)
    context = [as_example(item, i, names) for i, item in enumerate(examples)]
    if not context:
        raise ValueError("examples is empty: the context needs at least one labelled example")
    training = (
        context if train_examples is None else [as_example(e, i, names) for i, e in enumerate(train_examples)]
    )
    label_set = list(dict.fromkeys(e.label for e in context)) if labels is None else list(labels)
    for name, items in (("examples", context), ("train_examples", training)):
        for i, example in enumerate(items):
            if example.label not in label_set:
                raise ValueError(f"{name}[{i}] has label {example.label!r}, not in the label set {label_set}")
    config = build_context(tokenizer, context, template, **{**CONTEXT_DEFAULTS, **context_options})
    model = CPTModel(base_model, config, **(model_kwargs or {}))
    model.task = task_of(template, label_set)
    dataset = CPTDataset(tokenizer, training, template)
    result = train(
        model,
        dataset,
        train_config or TrainConfig(),
        collator=CPTCollator(tokenizer.pad_token_id),
        eval_fn=eval_fn,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
    )
    return model, result
