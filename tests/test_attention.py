"""`cpt.attention`: one-copy attention against `transformers`' own eager attention over the
concatenated ``[context ; sample]`` keys, and the switches that put it (and causal SDPA) in force
for a block and bring the model's own attention back after it."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_model
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from cpt import _compat, attention

BATCH, HEADS, KV_HEADS, SEQ, CONTEXT, DIM = 3, 4, 2, 5, 6, 8  # the tiny llama's heads: 4 query, 2 kv


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "query": torch.randn(BATCH, HEADS, SEQ, DIM, generator=g).to(dtype),
        "key": torch.randn(BATCH, KV_HEADS, SEQ, DIM, generator=g).to(dtype),
        "value": torch.randn(BATCH, KV_HEADS, SEQ, DIM, generator=g).to(dtype),
        "context_keys": torch.randn(1, KV_HEADS, CONTEXT, DIM, generator=g).to(dtype),
        "context_values": torch.randn(1, KV_HEADS, CONTEXT, DIM, generator=g).to(dtype),
    }


def _eager(module, t: dict[str, torch.Tensor], context_mask, sample_mask, scaling: float, softcap):  # type: ignore[no-untyped-def]
    """`transformers`' eager attention over the B copies of ``[context ; sample]`` keys, with the
    explicit (B, 1, S, N + S) mask a KV cache would come with."""
    keys = torch.cat([t["context_keys"].expand(BATCH, -1, -1, -1), t["key"]], dim=2)
    values = torch.cat([t["context_values"].expand(BATCH, -1, -1, -1), t["value"]], dim=2)
    seen = torch.ones(BATCH, SEQ, CONTEXT, dtype=torch.bool) if context_mask is None else (
        context_mask.bool().expand(BATCH, SEQ, -1))
    own = torch.ones(SEQ, SEQ, dtype=torch.bool).tril().expand(BATCH, -1, -1)
    if sample_mask is not None:
        own = own & sample_mask.bool()[:, None, :]
    allowed = torch.cat([seen, own], dim=2).unsqueeze(1)  # (B, 1, S, N + S)
    additive = torch.zeros(allowed.shape, dtype=t["query"].dtype).masked_fill(~allowed, torch.finfo(t["query"].dtype).min)
    out, _ = eager_attention_forward(module, t["query"], keys, values, additive, scaling=scaling, softcap=softcap)
    return out


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("masks", ["none", "padding", "padding and context"])
def test_one_copy_attention_is_eager_attention_over_the_concatenated_keys(
    dtype: torch.dtype, tolerance: float, softcap: float | None, masks: str
) -> None:
    model = make_model("llama").to(dtype)
    module = model.model.layers[1].self_attn  # layer_idx 1 picks the context's second layer
    t = _tensors(dtype)
    sample_mask = None if masks == "none" else torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    context_mask = torch.tensor([1, 0, 1, 1, 0, 1]) if masks == "padding and context" else None
    unused = (torch.zeros_like(t["context_keys"]), torch.zeros_like(t["context_values"]))
    context = [unused, (t["context_keys"], t["context_values"])]
    with attention.shared_context(model, context, context_mask, sample_mask):
        got, weights = attention.shared_context_attention(
            module, t["query"], t["key"], t["value"], None, scaling=0.3, softcap=softcap
        )
    expected = _eager(module, t, context_mask, sample_mask, 0.3, softcap)
    assert got.shape == (BATCH, SEQ, HEADS, DIM) and got.dtype == dtype and weights is None
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_the_default_scale_is_one_over_the_root_of_the_head_size() -> None:
    model = make_model("llama")
    module = model.model.layers[0].self_attn
    t = _tensors(torch.float32)
    with attention.shared_context(model, [(t["context_keys"], t["context_values"])], None, None):
        got, _ = attention.shared_context_attention(module, t["query"], t["key"], t["value"], None)
    torch.testing.assert_close(got, _eager(module, t, None, None, DIM**-0.5, None), rtol=1e-6, atol=1e-6)


def test_the_switch_counts_its_calls_and_brings_the_models_attention_back() -> None:
    model = make_model("llama")
    module = model.model.layers[0].self_attn
    t = _tensors(torch.float32)
    assert _compat.attention_implementation(model) == "eager"
    with attention.shared_context(model, [(t["context_keys"], t["context_values"])], None, None) as shared:
        assert _compat.attention_implementation(model) == attention.NAME
        for _ in range(3):
            attention.shared_context_attention(module, t["query"], t["key"], t["value"], None)
    assert shared.calls == 3
    assert _compat.attention_implementation(model) == "eager"
    with pytest.raises(KeyError), attention.shared_context(model, [(t["context_keys"], t["context_values"])], None, None):
        raise KeyError("a pass that fails")
    assert _compat.attention_implementation(model) == "eager"  # after a failure too


def test_one_copy_attention_is_refused_outside_its_block_and_with_dropout() -> None:
    model = make_model("llama")
    module = model.model.layers[0].self_attn
    t = _tensors(torch.float32)
    with pytest.raises(RuntimeError, match=r"^cpt_shared_context attention used outside cpt\.attention\.shared_context$"):
        attention.shared_context_attention(module, t["query"], t["key"], t["value"], None)
    with attention.shared_context(model, [(t["context_keys"], t["context_values"])], None, None), pytest.raises(
        ValueError, match="^shared-context attention runs the frozen model without dropout$"
    ):
        attention.shared_context_attention(module, t["query"], t["key"], t["value"], None, dropout=0.1)


def test_a_captured_switch_is_restored_for_a_recompute() -> None:
    """The recompute of a checkpointed layer runs after the block: `restore` puts the same
    switch (the same context, the same count) back in force for it, and takes it away again."""
    model = make_model("llama")
    module = model.model.layers[0].self_attn
    t = _tensors(torch.float32)
    assert attention.capture() == (None, None)
    with attention.shared_context(model, [(t["context_keys"], t["context_values"])], None, None) as shared:
        state = attention.capture()
        first, _ = attention.shared_context_attention(module, t["query"], t["key"], t["value"], None)
    with attention.restore(state):
        assert _compat.attention_implementation(model) == attention.NAME
        again, _ = attention.shared_context_attention(module, t["query"], t["key"], t["value"], None)
    assert torch.equal(again, first) and shared.calls == 2
    assert _compat.attention_implementation(model) == "eager" and attention.capture() == (None, None)
    with attention.restore((None, None)):  # nothing captured: nothing switched
        assert _compat.attention_implementation(model) == "eager"


def test_models_without_sdpa_keep_their_own_context_attention() -> None:
    base_model = make_model("llama")  # eager attention
    with attention.causal_context(base_model):
        assert _compat.attention_implementation(base_model) == "eager"
    base_model.set_attn_implementation("sdpa")
    with attention.causal_context(base_model):
        assert _compat.attention_implementation(base_model) == attention.CAUSAL_NAME
    assert _compat.attention_implementation(base_model) == "sdpa"


def test_causal_sdpa_without_a_mask_gives_the_models_logits() -> None:
    base_model = make_model("llama")
    base_model.set_attn_implementation("sdpa")
    embeds = base_model.get_input_embeddings()(torch.tensor([[5, 9, 14, 3, 7, 21]]))  # (1, N, d)
    with torch.no_grad():
        expected = base_model(inputs_embeds=embeds).logits
        with attention.causal_context(base_model):
            got = base_model(inputs_embeds=embeds).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
