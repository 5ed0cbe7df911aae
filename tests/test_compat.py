"""Each use of `transformers` that `cpt._compat` names, checked on the release installed (CI runs
this file on 5.17 and on the newest release)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import transformers
from tiny_models import make_model

from cpt import _compat


def _context_states(model: torch.nn.Module, tokens: int = 5) -> _compat.KV:
    cache = _compat.ContextKV(None, model.config)
    ids = torch.arange(3, 3 + tokens).unsqueeze(0)
    model(input_ids=ids, use_cache=True, **_compat.cache_kwargs(model, cache))
    return _compat.cache_tensors(cache)


def test_the_cache_goes_in_and_comes_out_under_this_release_s_name() -> None:
    model = make_model("llama")
    name = "cache" if "cache" in _compat.cache_kwargs(model, None) else "past_key_values"
    assert name == ("cache" if _compat.forward_takes(type(model), "cache") else "past_key_values")
    output = model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True)
    cache = _compat.output_cache(output)
    assert isinstance(cache, transformers.DynamicCache)
    (keys, values), *_ = _compat.cache_tensors(cache)
    assert keys.shape[:3] == (1, 2, 3) and values.shape == keys.shape  # (batch, kv heads, tokens, dim)
    assert len(_compat.cache_tensors(cache)) == model.config.num_hidden_layers


def test_context_kv_modes() -> None:
    model = make_model("llama")
    states = _context_states(model)  # 5 tokens, batch 1
    new = torch.randn(2, 2, 3, 8)
    prefix = _compat.ContextKV(states, model.config, "prefix", batch_size=2)
    keys, values = prefix.update(new, new, 0)
    assert keys.shape == (2, 2, 8, 8) and torch.equal(keys[:, :, 5:], new)
    assert torch.equal(keys[1, :, :5], states[0][0][0])
    assert prefix.get_seq_length() == 5  # read, never written
    passing = _compat.ContextKV(states, model.config, "pass")
    assert passing.update(new, new, 0)[0] is new and passing.get_seq_length() == 5
    open_ = _compat.ContextKV(states, model.config, "open", batch_size=2)
    open_.update(new, new, 0)
    assert open_.get_seq_length() == 8  # grows, as any DynamicCache
    empty = _compat.ContextKV(None, model.config)
    empty.update(new[:1], new[:1], 0)
    empty.seal()
    assert empty.update(new, new, 0)[0] is new and empty.get_seq_length() == 3


def test_states_broadcast_as_views_that_carry_gradients() -> None:
    keys = torch.randn(1, 2, 4, 8, requires_grad=True)
    (wide, _), = _compat.broadcast([(keys, keys)], 3)
    assert wide.shape == (3, 2, 4, 8) and wide.data_ptr() == keys.data_ptr()
    wide.sum().backward()
    assert torch.equal(keys.grad, torch.full_like(keys, 3.0))


def test_one_definition_of_the_sliding_window() -> None:
    assert _compat.sliding_window(make_model("gemma2").config) == 256
    assert _compat.sliding_window(make_model("mistral").config) is None
    unused = SimpleNamespace(sliding_window=64, layer_types=["full_attention"] * 2)  # no layer slides
    assert _compat.sliding_window(unused) is None
    assert _compat.sliding_window(SimpleNamespace(sliding_window=64)) == 64


def test_transformers_own_checkpointing_is_seen() -> None:
    model = make_model("llama")
    assert not _compat.hf_checkpointing(model)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable  # 5.24, 5.17
    enable()
    assert _compat.hf_checkpointing(model)
    assert len(_compat.decoder_layers(model)) == model.config.num_hidden_layers


def test_attention_functions_are_registered_and_switched_by_public_api() -> None:
    calls = []

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return sdpa(*args, **kwargs)

    sdpa = _compat.attention_function("sdpa")
    _compat.register_attention("cpt_test_counting", counting, lambda *a, **k: None)
    model = make_model("llama")
    assert _compat.attention_implementation(model) == "eager" and _compat.can_switch_attention(model)
    _compat.set_attention(model, "cpt_test_counting")
    assert _compat.attention_implementation(model) == "cpt_test_counting"
    model(input_ids=torch.tensor([[3, 4, 5]]))
    _compat.set_attention(model, "eager")
    model(input_ids=torch.tensor([[3, 4, 5]]))
    assert len(calls) == model.config.num_hidden_layers and _compat.attention_implementation(model) == "eager"
    assert not _compat.can_switch_attention(make_model("bloom"))  # its attention is its own code
