"""Checks of what a caller hands to a `CPTModel` (the base model, the token tensors), before any
kernel sees them.

An id outside the vocabulary would otherwise surface as an ``IndexError`` from an embedding
lookup (or a device-side assert on CUDA), an int32 or float tensor as a ``RuntimeError`` from the
loss, a model without a language-model head as an ``AttributeError``; here each is one
``ValueError`` that names the input and the problem.
"""

from __future__ import annotations

import torch
from torch import nn

from cpt import passes
from cpt.config import IGNORE_INDEX


def check_token_ids(input_ids: torch.Tensor, labels: torch.Tensor | None, vocab_size: int) -> None:
    """Checks dtypes always, and values when the tensors are on the CPU (as collators make them;
    reading a GPU tensor's range would make the host wait for the device).

    Args:
        input_ids: (B, S) token ids.
        labels: (B, S) target ids or None; ``-100`` marks ignored positions.
        vocab_size: rows of the model's input embeddings.

    Raises:
        ValueError: ``input_ids must hold integer token ids, got torch.float32``, an integer
            tensor other than int64, or an id outside
            ``0 .. vocab_size - 1`` (naming the first such value).
    """
    for name, tensor in (("input_ids", input_ids), ("labels", labels)):
        if tensor is None:
            continue
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer token ids, got {tensor.dtype}")
        if tensor.dtype != torch.long:  # embedding lookups and the loss take int64 ids only
            raise ValueError(f"{name} must be a torch.long (int64) tensor, got {tensor.dtype}; convert it with .long()")
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


def check_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    input_type_mask: torch.Tensor | None,
) -> None:
    """Checks that the batch's tensors are tensors of ``input_ids``' (B, S) shape, B >= 1 and
    S >= 1, off the meta device, that the type codes are integers and that a CPU attention mask
    holds only 0 and 1.

    Raises:
        ValueError: naming the argument and what it is.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, seq_len) tensor, got {shape}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has no rows (batch size 0)")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens (seq_len 0)")
    tensors = (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels),
               ("input_type_mask", input_type_mask))
    for name, tensor in tensors:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a tensor or None, got {type(tensor).__name__}")
        if tuple(tensor.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but input_ids has shape {tuple(input_ids.shape)}"
            )
        if tensor.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device, which holds no data; give a tensor on the CPU or the model's device"
            )
    if input_type_mask is not None and (input_type_mask.dtype.is_floating_point or input_type_mask.dtype.is_complex):
        raise ValueError(f"input_type_mask must hold integer type codes, got {input_type_mask.dtype}")
    if attention_mask is not None and attention_mask.device.type == "cpu":  # a GPU mask would make the host wait
        _check_mask_values(attention_mask)


def _check_mask_values(attention_mask: torch.Tensor) -> None:
    """Refuses a mask value other than 0 and 1: the passes read any non-zero value (2, -1, NaN) as
    a real token, so such a mask would be obeyed as something it does not say."""
    bad = (attention_mask != 0) & (attention_mask != 1)
    if bool(bad.any()):
        raise ValueError(
            f"attention_mask must hold 0 (padding) and 1 (token) only, got {attention_mask[bad][0].item()!r}"
        )


def check_base_model(model: nn.Module) -> nn.Embedding:
    """Checks that ``model`` is a causal LM that CPT can wrap, and returns its input embeddings.

    A causal LM here is a decoder-only model with a language-model head that can generate:
    ``get_output_embeddings()`` is set, ``can_generate()`` is true and the config is not
    encoder-decoder. Its input embeddings must hold floating-point weights that are loaded (not
    on the ``meta`` device, unless ``accelerate`` dispatched the model and loads them on use):
    the context's rows are read from them.

    Raises:
        ValueError: naming the model's class and what it lacks.
    """
    kind = type(model).__name__
    if not isinstance(model, nn.Module):
        raise ValueError(f"base_model must be a transformers causal LM (a torch Module), got {kind}")
    embeddings = passes.input_embeddings(model)
    weight = embeddings.weight
    head = getattr(model, "get_output_embeddings", None)
    generates = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    if (
        not callable(head) or head() is None or not callable(generates) or not generates()
        or getattr(config, "is_encoder_decoder", False)
    ):
        raise ValueError(
            f"{kind} is not a causal LM (a decoder with a language-model head, as "
            "AutoModelForCausalLM loads); CPT scores and generates the next token"
        )
    if weight.device.type == "meta" and getattr(model, "hf_device_map", None) is None:  # offloaded: loaded on use
        raise ValueError(f"{kind}'s weights are on the meta device (not loaded); load them before wrapping the model")
    if not weight.dtype.is_floating_point:
        raise ValueError(
            f"{kind}'s input embeddings are {weight.dtype}; CPT needs floating-point embeddings "
            "(load the model in float32, bfloat16 or float16)"
        )
    return embeddings
