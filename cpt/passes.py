"""Every call of the frozen base model: the one module that runs it.

A pass takes the base model, the `cpt.context.Context` and tensors, and returns logits (only at
the positions asked for, through ``logits_to_keep``, so the model's own head, logit scaling or
soft-capping included) and, where it makes one, a KV cache:

- `context_pass`: the context alone (batch 1), into a cache that keeps its gradient;
- `against_context`: samples after a context whose per-layer KV states are given, attending to
  one copy of them (`cpt.attention`) or to B copies in a `transformers` cache;
- `plain`: ``[context ; sample]`` for each sample, from the start;
- `build_context_cache`: the trained context once, for inference (`ContextCache`);
- `query_pass` and `continuation_pass`: queries after the cached context, then continuations
  after ``[context ; query]`` (`cpt.infer.classify`);
- `generate`: `transformers`' generation after the cached context;
- `one_copy_exact`: the probe that tells whether one-copy attention is exact for a model.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cpt import _compat, attention
from cpt._compat import KV, ContextKV
from cpt.context import Context
from cpt.plan import Facts

PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
"""How far (in norm, relative) one-copy attention's logits may be from the model's own on the
probe, by the model's dtype; half precision gets `PROBE_TOLERANCE_HALF`."""

PROBE_TOLERANCE_HALF = 5e-2


@dataclass
class ContextCache:
    """The trained context, run once through the frozen model, for inference.

    Attributes:
        tensors: (keys, values) per layer, each (1, heads, N, head_dim).
        last_logits: (V,) float32 logits at the context's last position (they score the first
            token that follows the context).
        num_tokens: N.
        source: what it was built from (`cpt.model.CPTModel.context_key`: the model, its
            adapter's version, the dtype), so that a cache of another context is refused; None
            when unknown.
    """

    tensors: KV
    last_logits: torch.Tensor
    num_tokens: int
    source: tuple | None = None


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The model's input embeddings.

    Raises:
        ValueError: if it has none (not a causal LM).
    """
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is None or not hasattr(embeddings, "weight"):
        raise ValueError(f"{type(model).__name__} has no input embeddings; CPT needs a causal LM")
    return embeddings


def embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, S, d) word embeddings of (B, S) ids, in the model's dtype."""
    return input_embeddings(model)(input_ids)


def full_mask(
    context: Context, attention_mask: torch.Tensor | None, batch_size: int, seq_len: int
) -> torch.Tensor | None:
    """(B, N + S) mask of ``[context ; sample]``, or None where every position is visible and the
    caller gave none (as PEFT: no mask at all)."""
    if attention_mask is None and context.fully_visible:
        return None
    if attention_mask is None:
        attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=context.mask.device)
    prefix = context.mask.unsqueeze(0).expand(batch_size, -1).to(attention_mask.dtype)
    return torch.cat([prefix, attention_mask.to(prefix.device)], dim=1)


def context_pass(
    model: nn.Module, context: Context, dtype: torch.dtype, keep: torch.Tensor, *, causal: bool
) -> tuple[torch.Tensor, ContextKV]:
    """The context alone, batch 1: its logits at ``keep`` (K, V) and its cache, sealed (later
    passes and checkpointed recomputes store nothing more in it).

    Args:
        causal: run SDPA as causal without a mask where the context is fully visible
            (`cpt.attention.causal_context`); only for models whose attention goes through the
            interface.
    """
    cache = ContextKV(None, model.config)
    mask = context.attention_mask()
    switch = attention.causal_context(model) if causal and mask is None else nullcontext()
    embeds = context.embeddings(dtype).unsqueeze(0)  # (1, N, d)
    with switch:
        output = _run(model, embeds, None if mask is None else mask.unsqueeze(0), keep, cache)
    cache.seal()
    return output.logits[0], cache


@torch.no_grad()
def build_context_cache(model: nn.Module, context: Context, *, causal: bool) -> ContextCache:
    """Runs the (constant, trained) context once and keeps its KV cache for inference."""
    dtype = input_embeddings(model).weight.dtype
    logits, cache = context_pass(model, context, dtype, context.keep[-1:], causal=causal)
    return ContextCache(_compat.cache_tensors(cache), logits[-1].float(), context.num_tokens)


def against_context(
    model: nn.Module,
    context: Context,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    states: KV,
    keep: torch.Tensor,
    *,
    one_copy: bool,
) -> torch.Tensor:
    """(B, K, V) logits at ``keep`` of the samples (B, S, d) run after the context whose per-layer
    KV ``states`` (batch 1) are given: against one copy of them or B copies (``one_copy``)."""
    batch_size, seq_len = embeds.shape[:2]
    mask = full_mask(context, attention_mask, batch_size, seq_len)
    if one_copy:
        with attention.shared_context(model, states, context.attention_mask(), attention_mask):
            return _run(model, embeds, mask, keep, ContextKV(states, model.config, "pass")).logits
    return _run(model, embeds, mask, keep, ContextKV(states, model.config, "prefix", batch_size)).logits


def plain(
    model: nn.Module, context: Context, embeds: torch.Tensor, attention_mask: torch.Tensor | None, keep: torch.Tensor
) -> torch.Tensor:
    """(B, K, V) logits at ``keep`` (positions in ``[context ; sample]``), running the context with
    each of the B samples (B, S, d)."""
    batch_size, seq_len = embeds.shape[:2]
    prefix = context.embeddings(embeds.dtype).unsqueeze(0).expand(batch_size, -1, -1)
    mask = full_mask(context, attention_mask, batch_size, seq_len)
    return _run(model, torch.cat([prefix, embeds], dim=1), mask, keep).logits


def query_pass(
    model: nn.Module, cache: ContextCache, input_ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, KV]:
    """b right-padded queries (b, S) after the cached context.

    Args:
        mask: (b, N + S) attention mask of ``[context ; queries]``.
        keep: query positions whose logits are kept.

    Returns:
        The (b, K, V) logits at ``keep`` and the per-layer (keys, values) of ``[context ; queries]``,
        each (b, heads, N + S, dim).
    """
    states = ContextKV(cache.tensors, model.config, "open", input_ids.shape[0])  # grows
    output = _run(model, embed(model, input_ids), mask, keep, states)
    return output.logits, _compat.cache_tensors(_compat.output_cache(output) or states)


def continuation_pass(
    model: nn.Module,
    prefix: KV,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    keep: torch.Tensor,
) -> torch.Tensor:
    """(R, K, V) logits at ``keep`` of R continuations (R, C) after per-row prefixes.

    Args:
        prefix: per-layer (keys, values) of each row's ``[context ; query]``, 1 or R rows each.
        mask: (R, P + C) attention mask of prefix and continuation.
        positions: (R, C) the continuation tokens' positions (they follow each query's padding).
    """
    cache = ContextKV(prefix, model.config, "prefix", input_ids.shape[0])
    # Bloom's ALiBi reads positions from the attention mask instead, which gives the same here
    kwargs = {"position_ids": positions} if _compat.forward_takes(type(model), "position_ids") else {}
    return _run(model, embed(model, input_ids), mask, keep, cache, **kwargs).logits


def generate(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, states: KV, **kwargs: Any) -> torch.Tensor:
    """``model.generate`` after the context whose ``states`` (batch 1) cover the first ids."""
    cache = ContextKV(states, model.config)
    return model.generate(input_ids=input_ids, attention_mask=mask, **_compat.cache_kwargs(model, cache), **kwargs)


def facts(model: nn.Module, device: torch.device) -> Facts:
    """What `cpt.plan.resolve` needs to know about ``model`` (probing it once, `one_copy_exact`)."""
    return Facts(
        sliding_window=_compat.sliding_window(model.config),
        hf_checkpointing=_compat.hf_checkpointing(model),
        one_copy_exact=one_copy_exact(model),
        device_type=device.type,
        sharded=_sharded(model),
    )


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards ``model``'s decoder layers (`cpt.distributed.shard_base_model`; only
    in a process group, so a lone process pays nothing to ask)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(layer, FSDPModule) for layer in _compat.decoder_layers(model))


_PROBED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, bool]] = weakref.WeakKeyDictionary()


def check_context_cache(cache: Any, num_tokens: int, source: tuple) -> None:
    """Refuses a cache built from another context: another model, or this one before its adapter
    or dtype changed (it would quietly score with the old context).

    Args:
        cache: what a caller passed as the context's cache.
        num_tokens: the context's length.
        source: what the context's cache is built from now (`cpt.model.CPTModel.context_key`).

    Raises:
        ValueError: if ``cache`` is not a `ContextCache`, has another length than the context, or
            was built from another context.
    """
    if not isinstance(cache, ContextCache):
        raise ValueError(f"context_cache must be a ContextCache or None, got {type(cache).__name__}")
    if cache.num_tokens != num_tokens:
        raise ValueError(
            f"context_cache holds {cache.num_tokens} tokens but the model's context has "
            f"{num_tokens}; build it with model.build_context_cache()"
        )
    if cache.source is not None and cache.source != source:
        raise ValueError(
            "context_cache was built from another context (another model, or this one before its "
            "adapter or dtype changed); build it again with model.build_context_cache(), or pass None"
        )


def one_copy_exact(model: nn.Module) -> bool:
    """Whether one-copy attention (`cpt.attention`) computes what ``model``'s own attention does.

    The capability check, run once per model and attention implementation: the model must route
    its attention through `transformers`' AttentionInterface (the function is called), and a
    probe (a 4-token context, two 3-token samples, one padded) must give the logits of the
    model's own cached path.
    """
    key = (_compat.attention_implementation(model), input_embeddings(model).weight.dtype)
    known = _PROBED.get(model)
    if known is None or known[0] != key:
        known = (key, _probe(model))
        _PROBED[model] = known
    return known[1]


@torch.no_grad()
def _probe(model: nn.Module) -> bool:
    if not _compat.can_switch_attention(model):
        return False
    embeddings = input_embeddings(model)
    device, dtype = embeddings.weight.device, embeddings.weight.dtype
    ids = torch.randint(embeddings.weight.shape[0], (7, 3), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]], device=device)  # (2, N + S)
    with torch.autocast(device.type, enabled=False):
        context = embeddings(ids[:4, 0]).unsqueeze(0)  # (1, 4, d)
        samples = embeddings(ids[4:, 1:].T)  # (2, 3, d)
        cache = ContextKV(None, model.config)
        _run(model, context, None, torch.tensor([3], device=device), cache)
        states = _compat.cache_tensors(cache)
        keep = torch.arange(3, device=device)
        own = _run(model, samples, mask, keep, ContextKV(states, model.config, "prefix", 2))
        try:
            with attention.shared_context(model, states, None, mask[:, 4:]) as shared:
                fast = _run(model, samples, mask, keep, ContextKV(states, model.config, "pass"))
        except Exception:  # noqa: BLE001 - a model that cannot take the function is not exact with it
            return False
    if shared.calls == 0:
        return False
    real = mask[:, 4:].bool()
    expected = own.logits[real].float()
    error = torch.linalg.vector_norm(fast.logits[real].float() - expected) / torch.linalg.vector_norm(expected)
    return bool(error <= PROBE_TOLERANCE.get(dtype, PROBE_TOLERANCE_HALF))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to a GPU through pinned memory, without
    making the host wait for the work already queued there."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _run(  # type: ignore[no-untyped-def]
    model: nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    keep: torch.Tensor,
    cache: Any = None,
    **kwargs: Any,
):
    """The one call of the base model's forward: ``logits_to_keep`` always, the cache under this
    release's name where there is one."""
    extra = {} if cache is None else _compat.cache_kwargs(model, cache)
    return model(
        inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep, use_cache=cache is not None, **extra, **kwargs
    )
