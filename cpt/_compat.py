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
def forward_takes(cls: type, name: str) -> bool:
    """Whether ``cls.forward`` has a parameter ``name``."""
    return name in inspect.signature(cls.forward).parameters


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that passes ``cache`` to ``model.forward`` in this release."""
    name = "cache" if forward_takes(type(model), "cache") else "past_key_values"
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
    tensors: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int, config: Any, *, read_only: bool = False
) -> DynamicCache:
    """A fresh cache whose layers hold ``tensors`` broadcast to ``batch_size`` rows.

    The expansion is a view, so gradients flow back to the batch-1 tensors (summed over rows).

    Args:
        tensors: (keys, values) per layer, each (1, heads, N, head_dim).
        batch_size: B.
        config: the model's config (tells sliding-window layers apart).
        read_only: for one forward pass over the samples: each layer returns the context's states
            followed by the new ones and stores nothing, so nothing grows and a checkpointed
            layer's recompute sees exactly what its first run saw. Generation needs False.
    """
    cache = (_PrefixCache if read_only else DynamicCache)(config=config)
    for layer_idx, (keys, values) in enumerate(tensors):
        DynamicCache.update(
            cache,
            keys.expand(batch_size, *keys.shape[1:]),
            values.expand(batch_size, *values.shape[1:]),
            layer_idx,
        )
    return cache


class _PrefixCache(DynamicCache):
    """A context's KV states that later tokens attend to, without being written to."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


class SealableCache(DynamicCache):
    """Fills as usual on the first pass; once ``sealed``, `update` hands the new states back
    untouched and stores nothing, so the recompute of a checkpointed layer in the backward pass
    sees what its first run saw and does not append the context a second time."""

    sealed = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.sealed:
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def sealed_cache(tensors: list[tuple[torch.Tensor, torch.Tensor]], config: Any) -> SealableCache:
    """A batch-1 cache holding the context's states that hands later states back unstored.

    The model then counts positions from N (the cache's length) while `cpt.attention` reads the
    context's keys and values from ``tensors`` directly.
    """
    cache = SealableCache(config=config)
    for layer_idx, (keys, values) in enumerate(tensors):
        DynamicCache.update(cache, keys, values, layer_idx)
    cache.sealed = True
    return cache


def sliding_window(config: Any) -> int | None:
    """The smallest sliding attention window of the model's layers, or None if there is none."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(t) for t in layer_types):
        return None
    return int(window) if window else None
