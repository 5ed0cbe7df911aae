import pytest
import torch
from contexts import context_config, sample_batch
from tiny_models import ARCHITECTURES, make_model

from cpt import CPTModel
from cpt.config import is_label, is_trainable


def _train(model: CPTModel, steps: int = 4, lr: float = 0.05) -> None:
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        model(**sample_batch(3, seed=step)).loss.backward()
        optimizer.step()
        model.project_()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_trains_and_round_trips(arch: str, tmp_path) -> None:
    model = CPTModel(make_model(arch), context_config(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.9))
    batch = sample_batch(3)
    before = model(**batch).loss
    assert torch.isfinite(before)
    _train(model)
    assert model.delta.abs().sum() > 0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (3, batch["input_ids"].shape[1], 96)
    for fmt in ("cpt", "peft"):
        model.save_pretrained(tmp_path / fmt, format=fmt)
        loaded = CPTModel.from_pretrained(make_model(arch), tmp_path / fmt)
        assert torch.equal(loaded.context_embeddings(), model.context_embeddings())
        again = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-5)


def test_invariants_after_training() -> None:
    base_model = make_model("llama")
    config = context_config(3, opt_projection_epsilon=0.05, opt_projection_format_epsilon=0.02)
    model = CPTModel(base_model, config)
    ids = torch.tensor(config.cpt_token_ids)
    embeddings = base_model.get_input_embeddings().weight.detach()[ids].clone()
    weights_before = {k: v.clone() for k, v in base_model.state_dict().items()}
    _train(model, steps=6, lr=0.5)  # a large step: every trainable row leaves its ball
    codes = torch.tensor(config.cpt_tokens_type_mask)
    assert torch.equal(model.base, embeddings)  # the frozen base never moves
    for name, value in base_model.state_dict().items():
        assert torch.equal(value, weights_before[name]), name  # nor does the model
    norms = model.delta.detach().norm(dim=1)
    assert torch.all(norms <= model.epsilon * (1 + 1e-5))
    frozen = ~is_trainable(codes)
    assert torch.all(model.delta.detach()[frozen] == 0)  # labels and separators stay exactly zero
    trainable = is_trainable(codes)
    torch.testing.assert_close(norms[trainable], model.epsilon[trainable], rtol=1e-5, atol=0)
    assert is_label(codes).sum() > 0


def test_only_target_logits_are_built_and_labels_never_reach_the_base_model() -> None:
    base_model = make_model("llama")
    model = CPTModel(base_model, context_config())
    batch = sample_batch(4)
    model.execution_plan("loss", 4, 9)  # the capability probe runs once per model, before the hooks
    seen_rows = []
    head = base_model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: seen_rows.append(out.shape[:-1].numel()))
    base_model.register_forward_pre_hook(
        lambda module, args, kwargs: (_ for _ in ()).throw(AssertionError("labels passed"))
        if kwargs.get("labels") is not None else None,
        with_kwargs=True,
    )
    for sharing in ("off", "on"):
        model.context_sharing = sharing
        seen_rows.clear()
        out = model(**batch)
        full = 4 * (model.num_virtual_tokens + batch["input_ids"].shape[1])
        assert sum(seen_rows) < full / 3, (sharing, seen_rows, full)
        assert out.num_targets > 0


def test_auto_sharing_uses_plain_path_for_one_sample(monkeypatch) -> None:
    from cpt import loss

    model = CPTModel(make_model("llama"), context_config())
    calls = []
    monkeypatch.setattr(loss, "shared_total", lambda *a: calls.append("shared") or 1 / 0)
    model(**sample_batch(1))
    assert calls == []
    with pytest.raises(ZeroDivisionError):
        model(**sample_batch(2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype: torch.dtype) -> None:
    model = CPTModel(make_model("llama", dtype=dtype), context_config())
    assert model.delta.dtype == torch.float32 and model.base.dtype == torch.float32
    for sharing in ("off", "on"):
        model.context_sharing = sharing
        model.delta.grad = None
        loss = model(**sample_batch(2)).loss
        loss.backward()
        assert torch.isfinite(loss) and model.delta.grad.dtype == torch.float32


def test_moving_the_model_keeps_the_adapter_in_float32() -> None:
    model = CPTModel(make_model("llama"), context_config())
    with torch.no_grad():
        model.delta.normal_(0, 1e-3)
    delta = model.delta.detach().clone()
    model.to(torch.bfloat16)
    assert model.base_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.delta.dtype == torch.float32 and torch.equal(model.delta.detach(), delta)
    assert isinstance(model.delta, torch.nn.Parameter)


def test_callers_tensors_are_not_modified() -> None:
    model = CPTModel(make_model("llama"), context_config())
    batch = sample_batch(3)
    before = {k: v.clone() for k, v in batch.items()}
    for sharing in ("off", "on"):
        model.context_sharing = sharing
        model(**batch)
    for key, value in batch.items():
        assert torch.equal(value, before[key]), key


def test_context_cache_gives_the_same_logits() -> None:
    model = CPTModel(make_model("qwen2"), context_config())
    with torch.no_grad():
        model.delta.normal_(0, 0.01)
    batch = sample_batch(3)
    plain = model.sample_logits(batch["input_ids"], batch["attention_mask"])
    cache = model.build_context_cache()
    cached = model.sample_logits(batch["input_ids"], batch["attention_mask"], context_cache=cache)
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    again = model.sample_logits(batch["input_ids"], batch["attention_mask"], context_cache=cache)
    torch.testing.assert_close(again, cached, rtol=0, atol=0)  # the cache is not consumed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.update(attention_mask=b["attention_mask"][:, :-1]), "attention_mask has shape"),
        (lambda b: b.update(labels=b["labels"][:1]), "labels has shape"),
        (lambda b: b.update(input_type_mask=b["input_type_mask"][:, 1:]), "input_type_mask has shape"),
        (lambda b: b["input_type_mask"].__setitem__((0, 0), -3), "type code below 0: -3"),
        (lambda b: b.update(input_ids=b["input_ids"][0]), r"input_ids must be a \(batch, seq_len\) tensor"),
    ],
)
def test_bad_batches_are_named(change, message: str) -> None:
    model = CPTModel(make_model("llama"), context_config())
    batch = sample_batch(2)
    change(batch)
    with pytest.raises(ValueError, match=message):
        model(**batch)




def test_unknown_sharing_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="context_sharing must be one of .* got 'sometimes'"):
        CPTModel(make_model("llama"), context_config(), context_sharing="sometimes")
    model = CPTModel(make_model("llama"), context_config())
    with pytest.raises(ValueError, match="shared_attention must be one of"):
        model.shared_attention = "sometimes"  # checked when set, in the one vocabulary
    assert model.shared_attention == "auto"
    model.context_sharing, model.shared_attention = "off", "on"
    assert (model.context_sharing, model.shared_attention) == ("off", "on")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_activation_checkpointing_gives_the_same_loss_and_gradient(arch: str) -> None:
    batch = sample_batch(3)
    results = {}
    for checkpointed in (False, True):
        for sharing in ("off", "on"):
            model = CPTModel(make_model(arch), context_config(), activation_checkpointing=checkpointed)
            model.context_sharing = sharing
            with torch.no_grad():
                model.delta.copy_(torch.randn(model.delta.shape, generator=torch.Generator().manual_seed(3)) * 1e-2)
            loss = model(**batch).loss
            loss.backward()
            results[checkpointed, sharing] = (loss.detach(), model.delta.grad.clone())
    reference_loss, reference_grad = results[False, "off"]
    for key, (loss, grad) in results.items():
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=0)
        assert (grad - reference_grad).norm() / reference_grad.norm() <= 1e-5, key


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "opt", "phi", "gpt_neox", "qwen2", "mistral"])
def test_shared_context_attention_is_used_and_exact(arch: str, monkeypatch) -> None:
    import contextlib

    from cpt import attention

    calls = []
    original = attention.shared_context

    @contextlib.contextmanager
    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        with original(*args, **kwargs) as shared:
            yield shared
        calls.append(shared.calls)  # layers that attended through it

    monkeypatch.setattr(attention, "shared_context", counting)
    model = CPTModel(make_model(arch), context_config(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.8),
                     context_sharing="on")
    with torch.no_grad():
        model.delta.normal_(0, 0.02)
    batch = sample_batch(4)
    results = {}
    assert model.execution_plan("loss", 4, 9).one_copy is False  # auto: small contexts keep the cache path
    for shared_attention in ("on", "off"):
        model.shared_attention = shared_attention
        model.delta.grad = None
        calls.clear()
        loss = model(**batch).loss
        loss.backward()
        results[shared_attention] = (loss.detach(), model.delta.grad.clone(), list(calls))
    assert results["on"][2] == [2] and results["off"][2] == []  # one call per layer of the sample pass
    torch.testing.assert_close(results["on"][0], results["off"][0], rtol=1e-5, atol=0)
    assert (results["on"][1] - results["off"][1]).norm() / results["off"][1].norm() <= 1e-5
    cache = model.build_context_cache()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model.shared_attention = "on"
    fast = model.sample_logits(ids, mask, context_cache=cache)
    model.shared_attention = "off"
    slow = model.sample_logits(ids, mask, context_cache=cache)
    plain = model.sample_logits(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(fast[real], slow[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[real], plain[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_context_attention_without_padding_mask(arch: str) -> None:
    model = CPTModel(make_model(arch), context_config(), context_sharing="on")
    batch = sample_batch(2)
    batch["input_ids"] = batch["input_ids"][:, :7]
    batch["labels"] = batch["input_ids"].clone()
    batch["input_type_mask"] = batch["input_type_mask"][:, :7]
    del batch["attention_mask"]
    losses = {}
    for shared_attention in ("on", "off"):
        model.shared_attention = shared_attention
        losses[shared_attention] = model(**batch).loss
    torch.testing.assert_close(losses["on"], losses["off"], rtol=1e-5, atol=0)


def test_the_inference_api_runs_queries_and_continuations_after_the_cached_context() -> None:
    """`query_pass` then `continuation_pass` give the logits of ``[context ; query ; continuation]``
    run from the start (the plain path), and `check_fits` refuses what passes the positions."""
    model = CPTModel(make_model("llama"), context_config())
    with torch.no_grad():
        model.delta.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    assert model.vocab_size == 96
    query = torch.tensor([[5, 6, 7]])
    continuation = torch.tensor([[8, 9]])
    n = model.num_virtual_tokens
    logits, states, mask = model.query_pass(model.context_cache(), query, torch.ones_like(query), torch.tensor([2]))
    assert mask.shape == (1, n + 3) and bool(mask.all())
    positions = torch.arange(n + 3, n + 5).unsqueeze(0)
    after = model.continuation_pass(states, continuation, torch.ones(1, n + 5, dtype=torch.long), positions,
                                    torch.tensor([0]))
    whole = model.sample_logits(torch.cat([query, continuation], dim=1), positions=torch.tensor([2, 3]))
    torch.testing.assert_close(torch.cat([logits, after], dim=1), whole, rtol=1e-5, atol=1e-5)
    limit = model.base_model.config.max_position_embeddings
    model.check_fits(limit - n, "a query")
    with pytest.raises(ValueError, match="a query"):
        model.check_fits(limit - n + 1, "a query")
