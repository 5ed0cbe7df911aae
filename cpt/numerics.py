"""The training guard against NaN and infinity: a run stops at the first step that would write one.

A non-finite loss or gradient would make AdamW's update, and so ``delta``, non-finite, and every
later step and checkpoint with it. `check_finite_step` runs before the update, so the model keeps
the weights of the last good step and the last checkpoint stays good.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch


class NonFiniteError(ValueError):
    """A training step produced a NaN or infinite loss or gradient."""


def check_finite_step(loss: float, params: Iterable[torch.Tensor], step: int) -> None:
    """Raises if ``loss`` or a gradient of ``params`` is NaN or infinite.

    One device-to-host read for all the gradients, wherever they live.

    Args:
        loss: the step's loss, already read back to the host.
        params: the trained parameters, their ``.grad`` filled by the backward passes.
        step: the 1-based number of the step, for the message.

    Raises:
        NonFiniteError: ``training stopped at step <n>: the loss is nan ...``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    ok = finite_flags(grads).tolist() if grads else []
    if math.isfinite(loss) and all(ok):
        return
    if not math.isfinite(loss):
        what = f"the loss is {loss}"
    else:
        bad = grads[ok.index(False)]
        what = f"the gradient holds {int((~torch.isfinite(bad)).sum())} NaN or infinite values"
    raise NonFiniteError(
        f"training stopped at step {step}: {what} (before this step's update: the model and the last "
        "checkpoint keep the previous step's weights); lower the learning rate or check the data"
    )


def finite_flags(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flag per tensor, True where every value is finite, gathered on the first tensor's device
    (the tensors may live on several devices: a model spread over GPUs, or over a GPU and the CPU).

    Args:
        tensors: at least one tensor.

    Returns:
        A bool tensor of shape ``(len(tensors),)``; nothing is read back to the host.
    """
    device = tensors[0].device
    return torch.stack([torch.isfinite(t.detach()).all().to(device) for t in tensors])
