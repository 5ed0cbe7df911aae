"""The training guard against NaN and infinity: a run stops at the first step that would write one.

A non-finite loss or gradient would make AdamW's update, and so ``delta``, non-finite, and every
later step and checkpoint with it. `check_finite_step` runs before the update, so the model keeps
the weights of the last good step and the last checkpoint stays good.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class NonFiniteError(ValueError):
    """A training step produced a NaN or infinite loss or gradient."""


def check_finite_step(loss: torch.Tensor, params: Iterable[torch.Tensor], step: int) -> None:
    """Raises if ``loss`` or a gradient of ``params`` is NaN or infinite.

    One device-to-host read for the whole check.

    Args:
        loss: the step's (summed) loss, a scalar tensor.
        params: the trained parameters, their ``.grad`` filled by the backward passes.
        step: the 1-based number of the step, for the message.

    Raises:
        NonFiniteError: ``training stopped at step <n>: the loss is nan ...``.
    """
    flags = [torch.isfinite(loss.detach()).all()]
    grads = [p.grad for p in params if p.grad is not None]
    flags += [torch.isfinite(g).all() for g in grads]
    ok = torch.stack(flags).tolist()
    if all(ok):
        return
    if not ok[0]:
        what = f"the loss is {float(loss)}"
    else:
        bad = grads[ok.index(False) - 1]
        what = f"the gradient holds {int((~torch.isfinite(bad)).sum())} NaN or infinite values"
    raise NonFiniteError(
        f"training stopped at step {step}: {what} (before this step's update: the model and the last "
        "checkpoint keep the previous step's weights); lower the learning rate or check the data"
    )
