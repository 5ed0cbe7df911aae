"""`cpt.passes`: each pass of the frozen model gives the logits (and states) of one plain forward
of the model over ``[context ; sample]`` embeddings, with no cache (`contexts.plain_forward`).
Tiny random models, a context whose rows moved off the word embeddings, right-padded samples."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from contexts import context_config, plain_forward, sample_batch
from tiny_models import VOCAB, make_model

from cpt import CPTModel, _compat, passes
from cpt.context import Context

TOL = {"rtol": 1e-5, "atol": 1e-5}
ARCHS = ["llama", "gpt2"]  # rotary and learned positions, both through the attention interface


def _setup(arch: str, cpt_mask: list[int] | None = None) -> tuple[torch.nn.Module, Context]:
    """A tiny model and a 20-row context of it whose every row moved off the word embeddings."""
    base_model = make_model(arch)
    config = context_config()
    if cpt_mask is not None:
        config = replace(config, cpt_mask=cpt_mask)
    context = Context(config, passes.input_embeddings(base_model))
    with torch.no_grad():
        context.delta.copy_(torch.randn(context.delta.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return base_model, context


def _with_context_mask(context: Context, mask: torch.Tensor) -> torch.Tensor:
    """(B, N + S) mask of ``[context ; sample]`` from the (B, S) samples' mask."""
    return torch.cat([context.mask.expand(mask.shape[0], -1), mask], dim=1)


def _reference(base_model: torch.nn.Module, context: Context, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N + S, V) logits of the plain forward over ``[context ; samples]``."""
    return plain_forward(base_model, context.values(), passes.embed(base_model, ids), _with_context_mask(context, mask))


def _masked_context() -> list[int]:
    mask = [1] * context_config().num_virtual_tokens
    mask[2] = mask[5] = mask[11] = 0  # rows no one attends to
    return mask


# ---------------------------------------------------------------------- the training passes


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_gives_the_plain_forwards_logits_at_the_kept_positions(arch: str) -> None:
    base_model, context = _setup(arch)
    batch = sample_batch(3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n, s = context.num_tokens, ids.shape[1]
    keep = torch.tensor([n - 1, n, n + 3, n + s - 1])  # the context's last row, sample rows, a padded row
    with torch.no_grad():
        got = passes.plain(base_model, context, passes.embed(base_model, ids), mask, keep)
    assert got.shape == (3, 4, VOCAB)
    expected = _reference(base_model, context, ids, mask)[:, keep]
    real = _with_context_mask(context, mask)[:, keep].bool()
    torch.testing.assert_close(got[real], expected[real], **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_context_pass_gives_the_contexts_logits_and_states_with_their_gradient(arch: str) -> None:
    base_model, context = _setup(arch)
    logits, cache = passes.context_pass(base_model, context, torch.float32, context.keep, causal=False)
    with torch.no_grad():
        own = base_model(inputs_embeds=context.values().unsqueeze(0), use_cache=True)
    torch.testing.assert_close(logits, own.logits[0, context.keep], **TOL)
    states, expected = _compat.cache_tensors(cache), _compat.cache_tensors(_compat.output_cache(own))
    assert len(states) == len(expected) == base_model.config.num_hidden_layers
    for (keys, values), (own_keys, own_values) in zip(states, expected, strict=True):
        torch.testing.assert_close(keys, own_keys, **TOL)
        torch.testing.assert_close(values, own_values, **TOL)
    sum(keys.sum() + values.sum() for keys, values in states).backward()  # the states keep their gradient
    trainable = context.trainable_rows.squeeze(1)
    assert torch.count_nonzero(context.delta.grad[~trainable]) == 0  # reaching trainable rows only
    assert torch.count_nonzero(context.delta.grad[trainable].abs().sum(dim=1)) == int(trainable.sum())


def test_the_context_pass_seals_its_cache() -> None:
    """A later pass (or a checkpointed layer's recompute) that reads the cache stores nothing in it."""
    base_model, context = _setup("llama")
    _, cache = passes.context_pass(base_model, context, torch.float32, context.keep[-1:], causal=False)
    keys = _compat.cache_tensors(cache)[0][0]
    new = torch.randn(1, keys.shape[1], 3, keys.shape[3])
    returned = cache.update(new, new, 0)
    assert returned[0] is new and returned[1] is new  # handed back alone
    assert all(k.shape[2] == context.num_tokens for k, _ in _compat.cache_tensors(cache))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("one_copy", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_samples_against_the_context_states_give_the_plain_forwards_logits(
    arch: str, one_copy: bool, masked: bool
) -> None:
    base_model, context = _setup(arch, _masked_context() if masked else None)
    batch = sample_batch(3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    states = passes.build_context_cache(base_model, context, causal=False).tensors
    keep = torch.arange(ids.shape[1])
    with torch.no_grad():
        got = passes.against_context(
            base_model, context, passes.embed(base_model, ids), mask, states, keep, one_copy=one_copy
        )
    expected = _reference(base_model, context, ids, mask)[:, context.num_tokens:]
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], **TOL)


@pytest.mark.parametrize("one_copy", [False, True])
def test_the_gradient_through_the_context_states_is_the_plain_passes(one_copy: bool) -> None:
    base_model, context = _setup("llama")
    batch = sample_batch(3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = passes.embed(base_model, ids).detach()
    n, s = context.num_tokens, ids.shape[1]
    weights = torch.randn(3, s, VOCAB, generator=torch.Generator().manual_seed(2)) * mask.unsqueeze(-1)

    def gradient(logits: torch.Tensor) -> torch.Tensor:
        context.delta.grad = None
        (logits * weights).sum().backward()
        return context.delta.grad.clone()

    plain = gradient(passes.plain(base_model, context, embeds, mask, torch.arange(s) + n))
    _, cache = passes.context_pass(base_model, context, torch.float32, context.keep[-1:], causal=False)
    states = _compat.cache_tensors(cache)
    shared = gradient(passes.against_context(base_model, context, embeds, mask, states, torch.arange(s),
                                             one_copy=one_copy))
    assert torch.linalg.vector_norm(shared - plain) <= 1e-5 * torch.linalg.vector_norm(plain)


def test_full_mask_puts_the_contexts_mask_before_the_samples() -> None:
    _, context = _setup("llama", _masked_context())
    n = context.num_tokens
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    full = passes.full_mask(context, mask, 2, 3)
    assert torch.equal(full, torch.cat([context.mask.expand(2, -1), mask], dim=1))
    without = passes.full_mask(context, None, 2, 3)  # no sample mask: all its tokens are real
    assert without.shape == (2, n + 3) and torch.equal(without[:, n:], torch.ones(2, 3, dtype=torch.long))
    assert torch.equal(without[:, :n], context.mask.expand(2, -1))
    _, visible = _setup("llama")
    assert passes.full_mask(visible, None, 2, 3) is None  # nothing masked anywhere: no mask, as PEFT
    assert torch.equal(passes.full_mask(visible, mask, 2, 3)[:, :n], torch.ones(2, n, dtype=torch.long))


# ---------------------------------------------------------------------- the inference passes


@pytest.mark.parametrize("arch", ARCHS)
def test_the_context_cache_holds_the_contexts_states_and_last_logits(arch: str) -> None:
    base_model, context = _setup(arch)
    cache = passes.build_context_cache(base_model, context, causal=False)
    with torch.no_grad():
        own = base_model(inputs_embeds=context.values().unsqueeze(0), use_cache=True)
    assert cache.num_tokens == context.num_tokens and cache.source is None
    assert cache.last_logits.shape == (VOCAB,) and cache.last_logits.dtype == torch.float32
    torch.testing.assert_close(cache.last_logits, own.logits[0, -1].float(), **TOL)
    for (keys, values), (own_keys, own_values) in zip(
        cache.tensors, _compat.cache_tensors(_compat.output_cache(own)), strict=True
    ):
        assert not keys.requires_grad
        torch.testing.assert_close(keys, own_keys, **TOL)
        torch.testing.assert_close(values, own_values, **TOL)


def _queries(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, S) right-padded query ids of the given lengths and their (b, S) mask."""
    longest = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), longest), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(longest) < torch.tensor(lengths).unsqueeze(1)).long()
    return ids * mask, mask


@pytest.mark.parametrize("arch", [*ARCHS, "bloom"])
def test_queries_after_the_cached_context_give_the_plain_forwards_logits_and_states(arch: str) -> None:
    base_model, context = _setup(arch)
    cache = passes.build_context_cache(base_model, context, causal=False)
    ids, mask = _queries([5, 3, 1])
    n, s = context.num_tokens, ids.shape[1]
    with torch.no_grad():
        logits, states = passes.query_pass(base_model, cache, ids, _with_context_mask(context, mask), torch.arange(s))
    expected = _reference(base_model, context, ids, mask)[:, n:]
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], **TOL)
    for (keys, values), (context_keys, context_values) in zip(states, cache.tensors, strict=True):
        assert keys.shape[0] == 3 and keys.shape[2] == n + s
        assert torch.equal(keys[:, :, :n], context_keys.expand(3, -1, -1, -1))  # the context, as cached
        assert torch.equal(values[:, :, :n], context_values.expand(3, -1, -1, -1))


@pytest.mark.parametrize("arch", [*ARCHS, "bloom"])
def test_continuations_after_padded_queries_give_the_plain_forwards_logits(arch: str) -> None:
    """Each continuation follows its query's padding: its positions say where it really stands."""
    base_model, context = _setup(arch)
    cache = passes.build_context_cache(base_model, context, causal=False)
    lengths = [5, 3, 1]
    ids, mask = _queries(lengths)
    n = context.num_tokens
    prefix_mask = _with_context_mask(context, mask)
    continuations = torch.tensor([[7, 8, 9], [10, 11, 12], [13, 14, 15]])  # (R, C)
    with torch.no_grad():
        _, states = passes.query_pass(base_model, cache, ids, prefix_mask, torch.arange(1))
        got = passes.continuation_pass(
            base_model, states, continuations, torch.cat([prefix_mask, torch.ones_like(continuations)], dim=1),
            n + torch.tensor(lengths).unsqueeze(1) + torch.arange(3), torch.arange(3),
        )
    for row, length in enumerate(lengths):
        sequence = torch.cat([ids[row, :length], continuations[row]]).unsqueeze(0)  # no padding
        expected = plain_forward(base_model, context.values(), passes.embed(base_model, sequence))
        torch.testing.assert_close(got[row], expected[0, n + length:], **TOL)


def test_generate_after_the_context_states_decodes_as_plain_forwards_do() -> None:
    base_model, context = _setup("llama")
    cache = passes.build_context_cache(base_model, context, causal=False)
    before = [(keys.clone(), values.clone()) for keys, values in cache.tensors]
    query = torch.tensor([5, 6, 7])
    input_ids = torch.cat([context.ids, query]).unsqueeze(0)  # the cache stands in for the context's ids
    with torch.no_grad():
        sequences = passes.generate(base_model, input_ids, torch.ones_like(input_ids), cache.tensors,
                                    max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    new: list[int] = []
    for _ in range(4):  # greedy decoding, re-running [context ; query ; new] every step
        embeds = passes.embed(base_model, torch.cat([query, torch.tensor(new, dtype=torch.long)]).unsqueeze(0))
        new.append(int(plain_forward(base_model, context.values(), embeds)[0, -1].argmax()))
    assert sequences[0, input_ids.shape[1]:].tolist() == new
    for (keys, values), (old_keys, old_values) in zip(cache.tensors, before, strict=True):  # reusable
        assert torch.equal(keys, old_keys) and torch.equal(values, old_values)


def test_a_cache_of_another_context_is_refused() -> None:
    base_model, context = _setup("llama")
    cache = replace(passes.build_context_cache(base_model, context, causal=False), source=("model", 1))
    n = context.num_tokens
    passes.check_context_cache(cache, n, ("model", 1))
    passes.check_context_cache(replace(cache, source=None), n, ("model", 2))  # unknown source: trusted
    with pytest.raises(ValueError, match=r"^context_cache must be a ContextCache or None, got tuple$"):
        passes.check_context_cache(("keys", "values"), n, ("model", 1))
    with pytest.raises(ValueError, match=rf"^context_cache holds {n} tokens but the model's context has {n + 1}"):
        passes.check_context_cache(cache, n + 1, ("model", 1))
    with pytest.raises(ValueError, match=r"^context_cache was built from another context"):
        passes.check_context_cache(cache, n, ("model", 2))


# ---------------------------------------------------------------------- the model's facts


def test_a_model_without_input_embeddings_is_named() -> None:
    with pytest.raises(ValueError, match=r"^Linear has no input embeddings; CPT needs a causal LM$"):
        passes.input_embeddings(torch.nn.Linear(2, 2))
    base_model = make_model("llama")
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(passes.embed(base_model, ids), base_model.get_input_embeddings().weight[ids])


def test_facts_say_what_the_plan_needs_to_know() -> None:
    llama = passes.facts(make_model("llama"), torch.device("cpu"))
    assert (llama.sliding_window, llama.hf_checkpointing, llama.one_copy_exact, llama.device_type) == (
        None, False, True, "cpu")
    assert passes.facts(make_model("gemma2"), torch.device("cpu")).sliding_window == 256
    checkpointed = make_model("llama")
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)  # 5.24; before: gradient_...
    (enable or checkpointed.gradient_checkpointing_enable)()
    assert passes.facts(checkpointed, torch.device("cpu")).hf_checkpointing is True


def test_the_capability_probe_refuses_models_outside_the_attention_interface() -> None:
    bloom = CPTModel(make_model("bloom"), context_config(), context_sharing="on", shared_attention="on")
    assert passes.one_copy_exact(bloom.base_model) is False  # ALiBi, its own attention code
    how = bloom.execution_plan("loss", 4, 9)
    assert how.shared and not how.one_copy and how.why_not_one_copy.name == "NOT_EXACT"
    assert passes.one_copy_exact(make_model("llama")) is True


def test_the_probe_runs_once_per_model_and_attention_implementation() -> None:
    base_model = make_model("llama")
    runs: list[int] = []
    base_model.register_forward_pre_hook(lambda *args: runs.append(1))
    assert passes.one_copy_exact(base_model) is True
    probed = len(runs)
    assert probed > 0
    assert passes.one_copy_exact(base_model) is True
    assert len(runs) == probed  # known: not probed again
    base_model.set_attn_implementation("sdpa")
    assert passes.one_copy_exact(base_model) is True
    assert len(runs) == 2 * probed  # another implementation: probed again


def test_to_device_leaves_a_tensor_already_there() -> None:
    tensor = torch.arange(3)
    assert passes.to_device(tensor, torch.device("cpu")) is tensor
    moved = passes.to_device(tensor, torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == (3,)
