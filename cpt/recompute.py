"""Activation checkpointing of the frozen model's layers that keeps KV caches working.

`transformers`' own gradient checkpointing turns the KV cache off (a recomputed layer would
write it twice), which would rule out the shared context. Here each decoder layer runs under
``torch.utils.checkpoint`` (non-reentrant) with the cache left in place: the context's cache is
sealed before the backward pass and the samples read theirs without writing (`cpt._compat.ContextKV`),
so a recompute sees what the first run saw.
Memory then holds each layer's input and the KV cache instead of every activation, at the cost of
running each layer's forward twice.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cpt import _compat, attention

_MARK = "_cpt_checkpointed"


def enable(model: nn.Module) -> int:
    """Checkpoints every decoder layer of ``model`` whenever gradients are being recorded.

    Returns:
        The number of layers wrapped.

    Raises:
        ValueError: if the model has no layers that `transformers` marks as checkpointable.
    """
    layers = _compat.decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no checkpointable decoder layers")
    for layer in layers:
        if getattr(layer, _MARK, False):
            continue
        layer.forward = functools.partial(_checkpointed_forward, layer.forward)
        setattr(layer, _MARK, True)
    return len(layers)


def disable(model: nn.Module) -> None:
    """Undoes `enable`."""
    for layer in _compat.decoder_layers(model):
        if getattr(layer, _MARK, False):
            del layer.forward  # the class's forward shows through again
            delattr(layer, _MARK)


def _checkpointed_forward(forward, *args, **kwargs):  # type: ignore[no-untyped-def]
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    state = attention.capture()  # the recompute runs after the pass: bring its attention back

    def run(*args, **kwargs):  # type: ignore[no-untyped-def]
        with attention.restore(state):
            return forward(*args, **kwargs)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)
