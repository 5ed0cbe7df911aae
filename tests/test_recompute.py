"""`cpt.recompute`: activation checkpointing of the frozen model's decoder layers that keeps the
KV cache working. Enabled, each layer runs again in the backward pass and the gradients stay
those of the plain passes; disabled, the layers are as they were."""

from __future__ import annotations

import pytest
import torch
from contexts import context_config, sample_batch
from tiny_models import VOCAB, make_model

from cpt import CPTModel, _compat, passes, recompute
from cpt.context import Context


def _counting(base_model: torch.nn.Module) -> list[int]:
    """Counts the runs of every decoder layer's MLP (a recompute runs it again)."""
    calls: list[int] = []
    for layer in _compat.decoder_layers(base_model):
        layer.mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


def _loss(base_model: torch.nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    weights = torch.randn(*embeds.shape[:2], VOCAB, generator=torch.Generator().manual_seed(6))
    return (base_model(inputs_embeds=embeds, use_cache=False).logits * weights).sum()  # no cache to write twice


def test_enable_wraps_every_layer_once_and_disable_unwraps_them() -> None:
    base_model = make_model("llama")
    layers = _compat.decoder_layers(base_model)
    assert recompute.enable(base_model) == len(layers) == 2
    assert recompute.enable(base_model) == 2  # again: nothing wrapped twice
    calls = _counting(base_model)
    embeds = base_model.get_input_embeddings()(torch.tensor([[3, 4, 5, 6]])).detach().requires_grad_()
    _loss(base_model, embeds).backward()
    assert len(calls) == 2 * 2  # each layer, and once more in the backward pass
    recompute.disable(base_model)
    assert all("forward" not in vars(layer) for layer in layers)  # the class's forward again
    calls.clear()
    _loss(base_model, embeds).backward()
    assert len(calls) == 2
    recompute.disable(base_model)  # disabling twice is harmless


def test_without_gradients_the_layers_run_once() -> None:
    base_model = make_model("llama")
    embeds = base_model.get_input_embeddings()(torch.tensor([[3, 4, 5, 6]]))
    with torch.no_grad():
        plain = base_model(inputs_embeds=embeds).logits
        recompute.enable(base_model)
        calls = _counting(base_model)
        assert torch.equal(base_model(inputs_embeds=embeds).logits, plain)
    assert len(calls) == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_recomputed_layers_give_the_same_gradient(arch: str) -> None:
    gradients = []
    for enabled in (False, True):
        base_model = make_model(arch)
        if enabled:
            recompute.enable(base_model)
        embeds = base_model.get_input_embeddings()(torch.tensor([[3, 4, 5, 6, 7]])).detach().requires_grad_()
        _loss(base_model, embeds).backward()
        gradients.append(embeds.grad)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("one_copy", [False, True])
def test_recomputed_passes_over_a_cached_context_give_the_same_gradient(one_copy: bool) -> None:
    """The context pass fills a cache, the samples' pass reads it (one copy or B), and the
    recompute of each layer in the backward pass sees what its first run saw."""
    batch = sample_batch(3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    gradients = []
    for enabled in (False, True):
        base_model = make_model("llama")
        context = Context(context_config(), base_model.get_input_embeddings())
        calls = _counting(base_model)
        if enabled:
            recompute.enable(base_model)
        _, cache = passes.context_pass(base_model, context, torch.float32, context.keep[-1:], causal=False)
        embeds = passes.embed(base_model, ids).detach()
        logits = passes.against_context(base_model, context, embeds, mask, _compat.cache_tensors(cache),
                                        torch.arange(ids.shape[1]), one_copy=one_copy)
        (logits * mask.unsqueeze(-1)).sum().backward()
        assert len(calls) == 2 * 2 * (2 if enabled else 1)  # two passes, two layers, recomputed or not
        gradients.append(context.delta.grad)
    assert torch.linalg.vector_norm(gradients[1] - gradients[0]) <= 1e-6 * torch.linalg.vector_norm(gradients[0])


def test_a_model_without_decoder_layers_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^Sequential has no checkpointable decoder layers$"):
        recompute.enable(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_activation_checkpointing_recomputes_the_layers() -> None:
    base_model = make_model("llama")
    model = CPTModel(base_model, context_config(), activation_checkpointing=True)
    model.execution_plan("loss", 2, 9)  # the capability probe runs once per model, before the hook
    calls = []
    layer = _compat.decoder_layers(base_model)[0]
    layer.mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # runs again on recompute
    model.context_sharing = "on"
    model(**sample_batch(2)).loss.backward()
    assert len(calls) == 4  # context and samples, each run again in the backward pass
    recompute.disable(base_model)
    calls.clear()
    model(**sample_batch(2)).loss.backward()
    assert len(calls) == 2
