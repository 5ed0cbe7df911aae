"""Checks of the token tensors a caller hands to a `CPTModel`, before any kernel sees them.

An id outside the vocabulary would otherwise surface as an ``IndexError`` from an embedding
lookup (or a device-side assert on CUDA), a float tensor as a ``RuntimeError``; here each is one
``ValueError`` that names the tensor and the value.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Label of positions the loss ignores."""


def check_token_ids(input_ids: torch.Tensor, labels: torch.Tensor | None, vocab_size: int) -> None:
    """Checks dtypes always, and values when the tensors are on the CPU (as collators make them;
    reading a GPU tensor's range would make the host wait for the device).

    Args:
        input_ids: (B, S) token ids.
        labels: (B, S) target ids or None; ``-100`` marks ignored positions.
        vocab_size: rows of the model's input embeddings.

    Raises:
        ValueError: ``input_ids must hold integer token ids, got torch.float32``, or an id outside
            ``0 .. vocab_size - 1`` (naming the first such value).
    """
    for name, tensor in (("input_ids", input_ids), ("labels", labels)):
        if tensor is None:
            continue
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer token ids, got {tensor.dtype}")
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        bad = (tensor < 0) | (tensor >= vocab_size)
        if name == "labels":
            bad &= tensor != IGNORE_INDEX
        if bool(bad.any()):
            value = int(tensor[bad][0])
            raise ValueError(
                f"{name} holds {value}, outside the model's vocabulary of {vocab_size} (ids 0..{vocab_size - 1}"
                + (", or -100 for ignored positions)" if name == "labels" else ")")
            )
