"""Every place where `cpt` depends on how `transformers` works inside: one door, each use named.

Supported: `transformers` >= 5.17, < 6 (tests run on 5.17 and the newest). Public API is used
wherever there is one; the rest is listed here with why, so that a release that changes it
breaks one module, and `tests/test_compat.py` sees it:

- the forward argument and output field of the KV cache: ``past_key_values`` in 5.17,
  ``cache`` from 5.24 (`cache_kwargs`, `output_cache`);
- caches: built with ``DynamicCache(ddp_cache_data=..., config=...)`` and read by iterating
  them (public); `ContextKV` overrides the public ``update`` to stop storing (`ContextKV`);
- attention: functions registered with ``AttentionInterface.register`` and
  ``AttentionMaskInterface.register``, switched with ``PreTrainedModel.set_attn_implementation``
  (public); the implementation in force is read from ``config._attn_implementation`` (private
  read: there is no public getter), and whether a class can switch at all from
  ``_can_set_attn_implementation`` (private read: the public setter only logs a warning);
- checkpointable decoder layers are ``transformers.modeling_layers.GradientCheckpointingLayer``;
  `cpt.recompute` replaces each one's ``forward`` on the instance, because `transformers`' own
  checkpointing turns the KV cache off; whether that one is on is ``is_activation_checkpointing``
  (5.24) or ``is_gradient_checkpointing`` (5.17);
- the GGUF reader, ``transformers.modeling_gguf_pytorch_utils``, draws its progress bar with
  plain ``tqdm``, which ``transformers.utils.logging.disable_progress_bar`` does not reach;
  `gguf_bar_follows_switch` swaps the module's ``tqdm`` for a disabled one while the switch is
  off (private write, undone on exit).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Any, Literal

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_layers import GradientCheckpointingLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer (keys, values), each (batch, kv_heads, tokens, head_dim)."""


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


def cache_tensors(cache: Any) -> KV:
    """The (keys, values) of each layer of a `DynamicCache`."""
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"unsupported cache type {type(cache).__name__}")
    return [(entry[0], entry[1]) for entry in cache]


class ContextKV(DynamicCache):
    """A `DynamicCache` that starts with a context's states and takes new ones in one of three ways:

    - ``"open"``: as any `DynamicCache`, storing them (generation; a pass that grows the cache),
      the context's states copied to ``batch_size`` rows;
    - ``"prefix"``: returns the context's states (as views of ``batch_size`` rows) followed by
      the new ones and stores nothing, so a pass over the samples neither grows the cache nor,
      where a checkpointed layer recomputes in the backward pass, sees what its first run did not;
    - ``"pass"``: returns the new states alone and stores nothing (one-copy attention reads the
      context apart; a context pass's recompute must not append the context a second time).

    Args:
        tensors: the context's (keys, values) per layer, each (1, kv_heads, N, head_dim); None
            for an empty cache (the context pass fills it, then `seal` it).
        config: the model's config (tells sliding-window layers apart).
        mode: as above.
        batch_size: the rows of the pass that reads it.
    """

    def __init__(
        self, tensors: KV | None, config: Any, mode: Literal["open", "prefix", "pass"] = "open", batch_size: int = 1
    ) -> None:
        rows = None if tensors is None else broadcast(tensors, batch_size)
        super().__init__(ddp_cache_data=rows if mode == "open" else tensors, config=config)
        self.prefix = rows
        self.mode = mode

    def seal(self) -> None:
        """From now on, hand new states back unstored (``"pass"``)."""
        self.mode = "pass"

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.mode == "pass":
            return key_states, value_states
        if self.mode == "prefix":
            keys, values = self.prefix[layer_idx]
            return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def broadcast(tensors: KV, batch_size: int) -> KV:
    """``tensors`` (batch 1) as views of ``batch_size`` rows: gradients flow back summed."""
    if batch_size == 1:
        return list(tensors)
    return [(k.expand(batch_size, *k.shape[1:]), v.expand(batch_size, *v.shape[1:])) for k, v in tensors]


def sliding_window(config: Any) -> int | None:
    """The smallest sliding attention window of the model's layers, or None if there is none
    (a window in the config that no layer uses, as Qwen2's without ``use_sliding_window``,
    counts as none)."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(t) for t in layer_types):
        return None
    return int(window) if window else None


def max_positions(config: Any) -> int | None:
    """The most positions the model can attend over (``max_position_embeddings``, GPT-2's
    ``n_positions``), or None if its config sets no limit (ALiBi models such as BLOOM)."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(config: Any, context_tokens: int, sample_tokens: int = 0, what: str = "samples") -> None:
    """Refuses a context of ``context_tokens``, followed by ``what`` of ``sample_tokens`` tokens,
    that needs more positions than the model has: learned position tables fail with an index
    error, rotary ones run on positions they were never trained on. One message for every caller."""
    limit = max_positions(config)
    total = context_tokens + sample_tokens
    if limit is None or total <= limit:
        return
    if sample_tokens == 0:
        raise ValueError(
            f"the context has {context_tokens} tokens, more than the model's {limit} positions: "
            "use fewer or shorter examples"
        )
    raise ValueError(
        f"{what} ({sample_tokens} tokens) and the context ({context_tokens} tokens) need {total} positions, "
        f"more than the model's {limit}: use fewer or shorter examples in the context, or shorter inputs"
    )


def hf_checkpointing(model: torch.nn.Module) -> bool:
    """Whether `transformers`' own gradient checkpointing is on (it turns KV caches off)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # 5.24, then 5.17
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's checkpointable decoder layers."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def register_attention(name: str, function: Callable[..., Any], mask: Callable[..., Any]) -> None:
    """Makes ``name`` an attention implementation `transformers` knows (once)."""
    if name not in AttentionInterface():
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, mask)


def attention_function(name: str) -> Callable[..., Any]:
    """The attention function registered as ``name`` (``"sdpa"``, ...)."""
    return AttentionInterface()[name]


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The attention implementation ``model`` runs now."""
    return getattr(model.config, "_attn_implementation", None)


def can_switch_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes another attention implementation at run time."""
    if not callable(getattr(model, "set_attn_implementation", None)):
        return False
    can = getattr(type(model), "_can_set_attn_implementation", None)
    return bool(can()) if callable(can) else True


def set_attention(model: torch.nn.Module, name: str) -> None:
    """Switches ``model`` (and its sub-models) to the attention implementation ``name``."""
    model.set_attn_implementation(name)


@contextmanager
def gguf_bar_follows_switch() -> Iterator[None]:
    """Inside the block, reading a GGUF file draws no progress bar when `transformers`' progress
    bars are off (``transformers.utils.logging.disable_progress_bar``), as its other bars do."""
    from transformers.utils import logging as hf_logging

    module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(module, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    module.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        module.tqdm = bar
