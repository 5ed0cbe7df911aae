"""What differs between the `transformers` 5.x releases that `cpt` supports.

`transformers` 5.24 renamed the forward argument and output field ``past_key_values`` to ``cache``
(the old name stays deprecated); 5.17 knows only ``past_key_values``. Everything that touches a
KV cache goes through the two functions below.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import torch
from transformers import DynamicCache


@lru_cache(maxsize=None)
def _forward_takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that passes ``cache`` to ``model.forward`` in this release."""
    name = "cache" if _forward_takes(type(model), "cache") else "past_key_values"
    return {name: cache}


def output_cache(output: Any) -> Any:
    """The KV cache of a model output, whichever name this release gives it (None if absent)."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    return cache


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) of each layer of a `DynamicCache`, each (batch, heads, tokens, head_dim)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__}")
    return [(layer.keys, layer.values) for layer in layers]


def expanded_cache(
    tensors: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int, config: Any
) -> DynamicCache:
    """A fresh `DynamicCache` whose layers hold ``tensors`` broadcast to ``batch_size`` rows.

    The expansion is a view, so gradients flow back to the batch-1 tensors (summed over rows).
    """
    cache = DynamicCache(config=config)
    for layer_idx, (keys, values) in enumerate(tensors):
        cache.update(
            keys.expand(batch_size, *keys.shape[1:]), values.expand(batch_size, *values.shape[1:]), layer_idx
        )
    return cache
