"""`transformers.Trainer` support: the projection after every step, adapter checkpoints, and
batches whose loss terms `Trainer` counts as CPT does.

- `CPTProjectionCallback` projects every update (the "P" of CPT's projected gradient descent)
  and writes the adapter into each checkpoint folder, so `CPTModel.from_pretrained(checkpoint)`
  loads it. What `Trainer` itself saves of a `CPTModel` is its `state_dict`: the adapter's
  ``base`` and ``delta`` only, never the base model, so tied embeddings save without complaint
  and ``resume_from_checkpoint`` restores the context.
- `TrainerCollator` adds ``shift_labels`` (the CPT loss targets, `cpt.loss.loss_targets`) to
  each batch: `Trainer` counts them into ``num_items_in_batch`` over the accumulated
  micro-batches and all ranks, and the loss divides by it (`cpt.loss.divisor`), so gradient
  accumulation and DDP give the loss and gradient of one big batch.

Kept apart from `cpt.train` because ``transformers.TrainerCallback`` loads the trainer's
utilities (and, through them, ``accelerate`` and ``peft`` when installed); ``import cpt`` stays
light and only code that uses the callback pays for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from cpt import loss
from cpt.config import AdapterFormat, check_adapter_format
from cpt.data import CPTCollator
from cpt.model import CPTModel


class CPTProjectionCallback(TrainerCallback):
    """Makes `transformers.Trainer` do CPT's projected gradient descent.

    ``Trainer`` calls ``on_step_end`` after ``optimizer.step()``, the scheduler step and
    ``zero_grad``, and before it logs, evaluates or saves, so every update is projected before
    anything uses or stores it. After ``Trainer`` writes a checkpoint, the process that saves
    (``args.should_save``) adds the adapter to the checkpoint folder. Usage::

        trainer = Trainer(model=cpt_model, args=args, train_dataset=dataset,
                          data_collator=TrainerCollator(cpt_model, tokenizer.pad_token_id),
                          callbacks=[CPTProjectionCallback()])

    Args:
        adapter_format: the layout of the adapter written into checkpoints, ``"cpt"`` (resumes
            inside the original balls) or ``"peft"``.

    Raises:
        ValueError: on a bad ``adapter_format``; when training begins (or at the first step),
            if the trained model is not (a wrapper of) a `CPTModel`.
    """

    def __init__(self, adapter_format: AdapterFormat = "cpt") -> None:
        self.adapter_format = check_adapter_format(adapter_format, "adapter_format")

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        find_cpt_model(model)  # a wrong model is reported before the first step runs

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        find_cpt_model(model).project_()

    def on_save(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():  # Trainer's own checkpoint, just written
            find_cpt_model(model).save_pretrained(folder, format=self.adapter_format)


class TrainerCollator:
    """Batches for `transformers.Trainer`: those of ``collator`` plus ``shift_labels``, the CPT
    loss targets of each row (`cpt.loss.loss_targets`).

    `Trainer` sums the entries of ``shift_labels`` other than -100 over the micro-batches of an
    optimizer step and over the ranks, and passes that as ``num_items_in_batch``; so the loss is
    normalised by the number of CPT loss terms of the whole batch (the context's labels count
    once per row). Without it `Trainer` would count every non-padding token.

    Args:
        model: the `CPTModel` being trained (its context decides the targets).
        pad_token_id: for the default collator, `cpt.data.CPTCollator(pad_token_id)`.
        collator: a collator of your own (returning ``labels`` and, ideally,
            ``input_type_mask``), instead of the default.

    Raises:
        ValueError: if ``model`` is not a `CPTModel`, or neither or both of ``pad_token_id`` and
            ``collator`` are given.
    """

    def __init__(
        self,
        model: CPTModel,
        pad_token_id: int | None = None,
        *,
        collator: Callable[[Sequence[Any]], Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        if not isinstance(model, CPTModel):
            raise ValueError(f"TrainerCollator needs a CPTModel, got {type(model).__name__}")
        if (pad_token_id is None) == (collator is None):
            raise ValueError("TrainerCollator needs exactly one of pad_token_id and collator")
        self.model = model
        self.collator = collator if collator is not None else CPTCollator(pad_token_id)

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        batch = dict(self.collator(items))
        if "labels" not in batch:
            raise ValueError("the collator's batches have no labels: there is no loss to count")
        batch["shift_labels"] = loss.loss_targets(self.model.context, batch["labels"], batch.get("input_type_mask"))
        return batch


def find_cpt_model(model: nn.Module | None) -> CPTModel:
    """The `CPTModel` inside ``model``, unwrapping DDP (``.module``) and compile (``._orig_mod``).

    Raises:
        ValueError: if there is none.
    """
    seen = model
    while seen is not None and not isinstance(seen, CPTModel):
        seen = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
    if seen is None:
        raise ValueError(f"CPTProjectionCallback needs a CPTModel, got {type(model).__name__}")
    return seen


class CPTTrainer(Trainer):
    """`transformers.Trainer` for a `CPTModel`: adds `CPTProjectionCallback` (unless given) and
    makes `save_model` write the adapter as well, so `CPTModel.from_pretrained` loads what
    ``trainer.save_model(folder)`` wrote. Everything else is `Trainer`'s.

    Args:
        *args: as for `transformers.Trainer`.
        adapter_format: the adapter layout written by `save_model` and into checkpoints,
            ``"cpt"`` or ``"peft"``.
        **kwargs: as for `transformers.Trainer`.
    """

    def __init__(self, *args: Any, adapter_format: AdapterFormat = "cpt", **kwargs: Any) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, CPTProjectionCallback) or c is CPTProjectionCallback for c in callbacks):
            callbacks.append(CPTProjectionCallback(adapter_format))
        self.adapter_format = adapter_format
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, then the adapter into the same folder (checkpoints get theirs
        from `CPTProjectionCallback.on_save`)."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            folder = output_dir if output_dir is not None else self.args.output_dir
            find_cpt_model(self.model).save_pretrained(folder, format=self.adapter_format)
