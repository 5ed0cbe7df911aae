"""CUDA-graph replay of the shared-context loss and of cached inference (`cpt.graphs`). The graph
tests need a CUDA device and skip without one; the rest check on the CPU what a capture relies on:
the same loss from padded batches (the loss's own plan and its host reads are in test_loss.py)."""

from __future__ import annotations

import pytest
import torch
from contexts import sample_batch
from test_loss import assert_same, loss_and_grad, trained_model
from tiny_models import make_model

from cpt import TrainConfig
from cpt import loss as cpt_loss
from cpt.data import CPTCollator
from cpt.graphs import GraphedLoss, pad_batch
from cpt.train import train

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def test_padding_a_batch_leaves_its_loss_unchanged() -> None:
    model = trained_model()
    batch = sample_batch(3)
    reference = loss_and_grad(model, lambda: model(**batch).loss)
    padded = pad_batch(
        batch["input_ids"], batch["attention_mask"], batch["labels"], batch["input_type_mask"], multiple=8
    )
    assert padded[0].shape[1] == 16 and batch["input_ids"].shape[1] == 9
    assert torch.equal(padded[0][:, :9], batch["input_ids"]) and padded[1][:, 9:].sum() == 0
    assert (padded[2][:, 9:] == -100).all() and (padded[3][:, 9:] == 0).all()
    names = ("input_ids", "attention_mask", "labels", "input_type_mask")
    again = loss_and_grad(model, lambda: model(**dict(zip(names, padded, strict=True))).loss)
    assert_same(again, reference)


def test_padding_without_a_mask_makes_one_and_a_multiple_adds_nothing() -> None:
    ids = torch.arange(6).view(2, 3)
    out_ids, mask, labels, codes = pad_batch(ids, None, ids, None, multiple=4)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]] and codes is None
    assert labels[:, 3].tolist() == [-100, -100]
    same = pad_batch(ids, None, ids, None, multiple=3)
    assert same[0] is ids and same[1] is None


def test_graphs_refuse_a_cpu_model_and_train_refuses_graphs_on_cpu() -> None:
    model = trained_model()
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedLoss(model)
    batch = sample_batch(2)
    items = [
        {"input_ids": batch["input_ids"][i].tolist(), "input_type_mask": batch["input_type_mask"][i].tolist()}
        for i in range(2)
    ]
    with pytest.raises(ValueError, match="cuda_graphs is on but the model is not on a CUDA device"):
        train(model, items, TrainConfig(cuda_graphs="on", progress=False), collator=CPTCollator(pad_token_id=0))
    with pytest.raises(ValueError, match="cuda_graphs must be one of"):
        TrainConfig(cuda_graphs="yes")


# ---------------------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2"])
def test_graph_replay_matches_eager_passes_over_shapes(arch: str) -> None:
    model = trained_model(arch).cuda()
    graphed = GraphedLoss(model)
    for batch_size, seed in [(4, 1), (4, 2), (3, 3), (4, 4), (1, 5)]:
        batch = sample_batch(batch_size, seed=seed)
        model.context_sharing = "on"
        eager = loss_and_grad(model, lambda b=batch: model(**b).loss)
        model.delta.grad = None
        loss, count = graphed(**batch)
        assert count == model(**batch).num_targets
        assert_same((loss, model.delta.grad.clone()), eager)
    assert graphed.enabled and graphed.captures == 3  # (4, 16), (3, 16), (1, 16) after padding


@needs_cuda
def test_graph_adds_scaled_gradients_like_backward() -> None:
    model = trained_model().cuda()
    graphed = GraphedLoss(model)
    batch = sample_batch(4)
    _, reference = loss_and_grad(model, lambda: model(**batch).loss)
    model.delta.grad = None
    for _ in range(3):  # capture, then two replays
        graphed(**batch, scale=0.5)
    torch.testing.assert_close(model.delta.grad, 1.5 * reference, rtol=1e-4, atol=1e-7)


@needs_cuda
@pytest.mark.parametrize(("batch_size", "accumulation"), [(2, 1), (1, 2)])
def test_training_with_graphs_matches_eager_training(batch_size: int, accumulation: int) -> None:
    batch = sample_batch(4)
    items = [
        {"input_ids": batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist(),
         "input_type_mask": batch["input_type_mask"][i][batch["attention_mask"][i] == 1].tolist()}
        for i in range(4)
    ]
    results = {}
    for mode in ("off", "on"):
        model = trained_model().cuda()
        config = TrainConfig(
            batch_size=batch_size, gradient_accumulation_steps=accumulation, epochs=3, learning_rate=1e-2,
            cuda_graphs=mode, mixed_precision="no", progress=False,
        )
        result = train(model, items, config, collator=CPTCollator(pad_token_id=0))
        results[mode] = (result.losses, model.delta.detach().clone())
    losses = {mode: torch.tensor(result[0]) for mode, result in results.items()}
    torch.testing.assert_close(losses["on"], losses["off"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results["on"][1], results["off"][1], rtol=1e-3, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_graphed_logits_match_eager_logits(arch: str) -> None:
    from cpt.graphs import GraphedLogits

    model = trained_model(arch).cuda()
    graphed = GraphedLogits(model)
    cache = model.context_cache()
    for batch_size, seed in [(4, 1), (4, 2), (2, 3)]:
        batch = sample_batch(batch_size, seed=seed)
        ids, mask = batch["input_ids"].cuda(), batch["attention_mask"].cuda()
        positions = torch.arange(2, ids.shape[1], device="cuda")
        expected = model.sample_logits(ids, mask, context_cache=cache, positions=positions)
        got = graphed(ids, mask, positions)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert graphed.enabled and graphed.captures == 2


@needs_cuda
def test_a_capture_that_fails_falls_back_to_eager_passes_with_one_warning(monkeypatch) -> None:
    model = trained_model().cuda()
    real = cpt_loss.shared_total

    def reads_back(*args):  # type: ignore[no-untyped-def]
        total = real(*args)
        float(total)  # a value read back from the GPU: fine eagerly, refused inside a capture
        return total

    monkeypatch.setattr(cpt_loss, "shared_total", reads_back)
    graphed = GraphedLoss(model)
    batch = sample_batch(4)
    model.context_sharing = "on"
    eager = loss_and_grad(model, lambda: model(**batch).loss)
    model.delta.grad = None
    with pytest.warns(UserWarning, match="CUDA graphs are off"):
        loss, _ = graphed(**batch)
    assert_same((loss, model.delta.grad.clone()), eager)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_context_pass_runs_causal_sdpa_without_a_mask(checkpointing: bool) -> None:
    from transformers import AttentionInterface

    from cpt import _compat, attention

    model = trained_model(activation_checkpointing=checkpointing)
    batch = sample_batch(4)
    model.context_sharing = "off"
    plain = loss_and_grad(model, lambda: model(**batch).loss)
    attention._register()
    masks: list[bool] = []
    sdpa = AttentionInterface()[attention.CAUSAL_NAME]

    def recording(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        masks.append(attention_mask is None)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(attention.CAUSAL_NAME, recording)
    try:
        model.context_sharing = "on"
        shared = loss_and_grad(model, lambda: model(**batch).loss)
        assert_same(shared, plain)
        layers = model.base_model.config.num_hidden_layers
        # every layer of the context pass, and again in the backward pass where layers recompute
        assert masks == [True] * layers * (2 if checkpointing else 1)
        assert _compat.attention_implementation(model.base_model) == "sdpa"
        cache = model.build_context_cache()
        assert len(masks) == layers * (3 if checkpointing else 2) and cache.num_tokens == model.num_virtual_tokens
    finally:
        AttentionInterface.register(attention.CAUSAL_NAME, sdpa)


@needs_cuda
def test_graphed_logits_capture_a_shape_on_its_nth_call() -> None:
    from cpt.graphs import GraphedLogits

    model = trained_model().cuda()
    with pytest.raises(ValueError, match="capture_after must be an integer >= 1"):
        GraphedLogits(model, capture_after=0)
    graphed = GraphedLogits(model, capture_after=2)
    batch = sample_batch(4)
    ids, mask = batch["input_ids"].cuda(), batch["attention_mask"].cuda()
    expected = model.sample_logits(ids, mask, context_cache=model.context_cache())
    for calls, captures in [(1, 0), (2, 1), (3, 1)]:
        got = graphed(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert graphed.captures == captures, calls


@needs_cuda
def test_graph_replay_with_activation_checkpointing_matches_eager() -> None:
    model = trained_model(activation_checkpointing=True).cuda()
    model.context_sharing = "on"
    graphed = GraphedLoss(model)
    for seed in (1, 2):  # capture, then a replay with other values
        batch = sample_batch(4, seed=seed)
        eager = loss_and_grad(model, lambda b=batch: model(**b).loss)
        model.delta.grad = None
        loss, _ = graphed(**batch)
        assert_same((loss, model.delta.grad.clone()), eager)
    assert graphed.enabled and graphed.captures == 1


@needs_cuda
def test_fit_trains_on_cuda_with_graphs_as_it_does_eagerly(monkeypatch) -> None:
    """The whole workflow on a GPU: `fit` with graphs on, and with its defaults, trains the context
    that eager training does (the NaN guard once crashed the first graphed step)."""
    from tokenizers_util import make_bpe_tokenizer

    from cpt import fit

    tokenizer = make_bpe_tokenizer()
    examples = [("a fine story", "positive"), ("an awful film", "negative"),
                ("the actors were good", "positive"), ("dull and long", "negative")]
    replays: list[int] = []
    real = GraphedLoss.backward

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        replays.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GraphedLoss, "backward", counted)
    results = {}
    for mode in ("off", "on", "auto"):
        base_model = make_model("llama", vocab_size=len(tokenizer))
        base_model.set_attn_implementation("sdpa")
        config = TrainConfig(epochs=3, learning_rate=1e-2, cuda_graphs=mode, mixed_precision="no", progress=False)
        model, result = fit(base_model.cuda(), tokenizer, examples, train_config=config, selection=None)
        assert model.delta.is_cuda and len(result.losses) == result.steps > 0
        results[mode] = (torch.tensor(result.losses), model.delta.detach().cpu())
        if mode == "on":
            assert replays, "cuda_graphs='on' ran no graphed step"
    for mode in ("on", "auto"):
        torch.testing.assert_close(results[mode][0], results["off"][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(results[mode][1], results["off"][1], rtol=1e-3, atol=1e-6)
