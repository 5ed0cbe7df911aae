"""Attention of B samples to one shared context, without copying the context B times.

With a KV cache, `transformers` attends the B samples to ``[context ; sample]`` keys: the cache
concatenates the context's keys and values to every sample's (B copies of N positions), the
grouped-query heads are repeated to all query heads (another copy), and an explicit (B, 1, S,
N + S) mask rules out the fast kernels. Those copies are kept for the backward pass, so at long
contexts they cost more memory than the context's own activations.

Here the sample pass runs with an attention function of our own (registered with `transformers`'
``AttentionInterface``, switched on only for that pass). For each layer it scores the queries
(B, H, S, D) against the context's keys (1, H_kv, N, D), shared by every sample and grouped-query
head through one batched matrix product, and against the sample's own keys (causal, padding
masked); one softmax runs over both parts, exactly as over the concatenation. Nothing of size
B x N x D is materialised.

The function reproduces `transformers`' eager attention (scaling, logit soft-capping, softmax in
float32). It is used only for models whose attention goes through the interface and for which a
probe showed it exact (`cpt.passes.one_copy_exact`); others keep the cache-concatenating path,
which is exact too, only heavier.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cpt import _compat

NAME = "cpt_shared_context"


@dataclass
class _Shared:
    model: Any  # the model whose attention implementation is switched
    context: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, H_kv, N, D) keys, values
    context_blocked: torch.Tensor | None  # (N,) bool: True where cpt_mask is 0; None: none
    sample_blocked: torch.Tensor | None  # (B or 1, 1, 1, S, S) bool: later or padding keys; made once
    calls: int = 0  # layers that called `shared_context_attention` (the capability probe reads it)


_ACTIVE: contextvars.ContextVar[_Shared | None] = contextvars.ContextVar("cpt_shared_context", default=None)

CAUSAL_NAME = "cpt_causal_sdpa"
"""`transformers`' own SDPA attention, with no mask made for it (`causal_context`)."""

_CAUSAL: contextvars.ContextVar[Any] = contextvars.ContextVar("cpt_causal_context", default=None)  # its model


@contextlib.contextmanager
def shared_context(
    model: torch.nn.Module,
    context: list[tuple[torch.Tensor, torch.Tensor]],
    context_mask: torch.Tensor | None,
    sample_mask: torch.Tensor | None,
) -> Iterator[_Shared]:
    """Runs ``model``'s attention as `shared_context_attention` inside the block (which gets the
    switch's state: its ``calls`` count the layers that used it).

    Args:
        model: the causal LM; its config's attention implementation is switched for the block.
        context: the context's (keys, values) per layer, each (1, H_kv, N, D).
        context_mask: (N,) 0/1 context attention mask, or None if all ones.
        sample_mask: (B, S) 0/1 sample attention mask, or None if all ones.
    """
    _register()
    device = context[0][0].device
    shared = _Shared(
        model=model,
        context=context,
        context_blocked=None if context_mask is None else ~context_mask.to(device).bool(),
        sample_blocked=None if sample_mask is None else ~_sample_allowed(sample_mask.to(device)),
    )
    with _switched(model, NAME, _ACTIVE, shared):
        yield shared


@contextlib.contextmanager
def causal_context(model: torch.nn.Module) -> Iterator[None]:
    """For a pass over the context alone (empty cache, every position visible): the model's
    SDPA attention runs with ``is_causal`` and no mask, whatever the circumstances.

    `transformers` does the same by itself, except while a CUDA graph is being captured: 5.17
    then writes the N x N causal mask out, which rules out the flash kernel (slower at long
    contexts) and makes a captured pass round differently from the eager one. Models whose
    attention is not SDPA are left alone; call it only for models whose attention goes through
    the interface (`cpt.plan.Facts.one_copy_exact`).
    """
    if _compat.attention_implementation(model) != "sdpa":
        yield
        return
    _register()
    with _switched(model, CAUSAL_NAME, _CAUSAL, model):
        yield


def capture() -> tuple[_Shared | None, Any]:
    """The attention switches in force now, for `restore` to bring back later."""
    return _ACTIVE.get(), _CAUSAL.get()


@contextlib.contextmanager
def restore(state: tuple[_Shared | None, Any]) -> Iterator[None]:
    """Puts captured attention switches back in force for the block: the recompute of a
    checkpointed layer, in the backward pass, must attend exactly as its first run did."""
    shared, causal = state
    with contextlib.ExitStack() as stack:
        if shared is not None and _ACTIVE.get() is not shared:
            stack.enter_context(_switched(shared.model, NAME, _ACTIVE, shared))
        if causal is not None and _CAUSAL.get() is not causal:
            stack.enter_context(_switched(causal, CAUSAL_NAME, _CAUSAL, causal))
        yield


@contextlib.contextmanager
def _switched(model: torch.nn.Module, name: str, var: contextvars.ContextVar, value: Any) -> Iterator[None]:
    previous = _compat.attention_implementation(model)
    token = var.set(value)
    _compat.set_attention(model, name)
    try:
        yield
    finally:
        _compat.set_attention(model, previous)
        var.reset(token)


def shared_context_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of the samples' queries to the shared context and to their own keys.

    Args:
        module: the attention module (its ``layer_idx`` picks the context's keys and values).
        query: (B, H, S, D).
        key: (B, H_kv, S, D) the samples' own keys (the cache is sealed: it returns them alone).
        value: (B, H_kv, S, D).
        attention_mask: ignored; masks come from the context set by `shared_context`.
        scaling: score scale; ``D ** -0.5`` if None.
        dropout: must be 0 (the frozen model runs in eval mode).
        softcap: ``softcap * tanh(score / softcap)`` before the softmax, as Gemma 2 does.

    Returns:
        ``(output, None)`` with output (B, S, H, D), as `transformers` attention functions do.
    """
    shared = _ACTIVE.get()
    if shared is None:
        raise RuntimeError(f"{NAME} attention used outside cpt.attention.shared_context")
    if dropout:
        raise ValueError("shared-context attention runs the frozen model without dropout")
    shared.calls += 1
    context_keys, context_values = shared.context[module.layer_idx]  # (1, H_kv, N, D)
    batch, heads, seq_len, dim = query.shape
    kv_heads, num_context = key.shape[1], context_keys.shape[2]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling

    # Scores against the context: one product per kv head for all samples and grouped heads.
    queries = query.view(batch, kv_heads, group, seq_len, dim)  # (B, H_kv, G, S, D)
    grouped = queries.permute(1, 0, 2, 3, 4).reshape(kv_heads, batch * group * seq_len, dim)
    context_scores = torch.baddbmm(  # (H_kv, B*G*S, N): scale * q k^T in one kernel
        grouped.new_empty(()), grouped, context_keys[0].transpose(1, 2), beta=0.0, alpha=scale
    )
    context_scores = context_scores.view(kv_heads, batch, group, seq_len, num_context).permute(1, 0, 2, 3, 4)
    # Scores against the samples' own keys.
    own_scores = torch.matmul(queries, key.unsqueeze(2).transpose(-1, -2)) * scale  # (B, H_kv, G, S, S)
    if softcap is not None:
        context_scores = torch.tanh(context_scores / softcap) * softcap
        own_scores = torch.tanh(own_scores / softcap) * softcap

    blocked = torch.finfo(own_scores.dtype).min
    if shared.context_blocked is not None:
        context_scores = context_scores.masked_fill(shared.context_blocked, blocked)
    if shared.sample_blocked is None:  # no padding: causal only, made by the first layer
        shared.sample_blocked = ~_sample_allowed(None, seq_len, device=query.device)
    own_scores = own_scores.masked_fill(shared.sample_blocked, blocked)

    scores = torch.cat([context_scores, own_scores], dim=-1)  # (B, H_kv, G, S, N + S)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    context_weights, own_weights = weights.split([num_context, seq_len], dim=-1)

    context_weights = context_weights.permute(1, 0, 2, 3, 4).reshape(kv_heads, batch * group * seq_len, num_context)
    out = torch.bmm(context_weights, context_values[0])  # (H_kv, B*G*S, D)
    out = out.view(kv_heads, batch, group, seq_len, dim).permute(1, 0, 2, 3, 4)  # (B, H_kv, G, S, D)
    out = out + torch.matmul(own_weights, value.unsqueeze(2))  # (B, H_kv, G, S, D)
    return out.reshape(batch, heads, seq_len, dim).transpose(1, 2).contiguous(), None


def _sample_allowed(
    sample_mask: torch.Tensor | None, seq_len: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """(B or 1, 1, 1, S, S): which of a sample's own keys each of its queries may see.

    Args:
        sample_mask: (B, S) 0/1 padding mask, or None (then ``seq_len`` and ``device`` give S
            and where to make it: made there, never copied, so a CUDA graph can capture it).
    """
    if sample_mask is None:
        return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None, None]
    seq_len = sample_mask.shape[1]
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=sample_mask.device).tril()  # (S, S)
    return (allowed & sample_mask.bool()[:, None, :])[:, None, None]


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask `transformers` would build for this pass: none, `shared_context_attention`
    masks by itself."""
    return None


def _register() -> None:
    """Makes both names known to `transformers` (on first use, not at import)."""
    _compat.register_attention(NAME, shared_context_attention, _no_mask)
    _compat.register_attention(CAUSAL_NAME, _compat.attention_function("sdpa"), _no_mask)
