"""`transformers.Trainer` support: a callback that projects CPT's updates after every step.

Kept apart from `cpt.train` because ``transformers.TrainerCallback`` loads the trainer's
utilities (and, through them, ``accelerate`` and ``peft`` when installed); ``import cpt`` stays
light and only code that uses the callback pays for it.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from cpt.model import CPTModel


class CPTProjectionCallback(TrainerCallback):
    """Makes `transformers.Trainer` do CPT's projected gradient descent.

    ``Trainer`` calls ``on_step_end`` after ``optimizer.step()``, the scheduler step and
    ``zero_grad``, and before it logs, evaluates or saves, so every update is projected before
    anything uses or stores it. Usage::

        trainer = Trainer(model=cpt_model, args=args, train_dataset=dataset,
                          data_collator=collator, callbacks=[CPTProjectionCallback()])

    Raises:
        ValueError: at the first step, if the trained model is not (a wrapper of) a `CPTModel`.
    """

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        find_cpt_model(model).project_()


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
