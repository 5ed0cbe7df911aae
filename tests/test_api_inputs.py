"""Bad API input: one ValueError naming the problem, before any kernel or training runs."""

import pytest
import torch
from contexts import context_config, sample_batch
from tiny_models import make_model
from tokenizers_util import make_wordlevel_tokenizer

from cpt import CPTModel, TrainConfig, fit, generate
from cpt.data import Example, build_context

EXAMPLES = [("good movie", "positive"), ("bad film", "negative")]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: {**b, "input_ids": b["input_ids"].float()}, "input_ids must hold integer token ids, got torch.float32"),
        (lambda b: {**b, "input_ids": b["input_ids"].bool()}, "input_ids must hold integer token ids, got torch.bool"),
        (lambda b: {**b, "input_ids": b["input_ids"] + 1000}, r"input_ids holds \d+, outside the model's vocabulary of 96"),
        (lambda b: {**b, "input_ids": b["input_ids"] - 1000}, r"input_ids holds -\d+, outside the model's vocabulary"),
        (lambda b: {**b, "labels": torch.where(b["labels"] >= 0, b["labels"] + 96, b["labels"])}, r"labels holds \d+, outside .* or -100"),
        (lambda b: {**b, "labels": b["labels"].float()}, "labels must hold integer token ids"),
    ],
)
def test_bad_token_tensors(arch: str, change, message: str) -> None:
    model = CPTModel(make_model(arch), context_config())
    batch = change(sample_batch(2))
    with pytest.raises(ValueError, match=message):
        model(**batch)
    if message.startswith("input_ids"):  # the logits path checks the same
        with pytest.raises(ValueError, match=message):
            model(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_past_the_models_positions(arch: str) -> None:
    tokenizer = make_wordlevel_tokenizer()
    config = build_context(tokenizer, [Example(t, label) for t, label in EXAMPLES])
    model = CPTModel(make_model(arch), config)
    with pytest.raises(ValueError, match=r"text 0: .* generation may reach \d+, more than the model's 512; lower max_new_tokens"):
        generate(model, tokenizer, ["good"], max_new_tokens=600, do_sample=False)
    with pytest.raises(ValueError, match=r"generation may reach 600, more than the model's 512"):
        generate(model, tokenizer, ["good"], max_length=600, do_sample=False)
    assert len(generate(model, tokenizer, ["good"], max_new_tokens=2, do_sample=False)) == 1


def _with_positions(arch: str, limit: int) -> torch.nn.Module:
    base_model = make_model(arch)
    setattr(base_model.config, "n_positions" if arch == "gpt2" else "max_position_embeddings", limit)
    return base_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary and learned positions
def test_context_and_samples_past_the_models_positions(arch: str) -> None:
    tokenizer = make_wordlevel_tokenizer()
    config = build_context(tokenizer, [Example(t, label) for t, label in EXAMPLES])
    n = config.num_virtual_tokens
    with pytest.raises(ValueError, match=rf"the context has {n} tokens, more than the model's {n - 1} positions"):
        CPTModel(_with_positions(arch, n - 1), config)

    model = CPTModel(_with_positions(arch, n + 4), config)
    ids = torch.full((2, 5), 5)
    needs = rf"samples \(5 tokens\) and the context \({n} tokens\) need {n + 5} positions, more than the model's {n + 4}"
    with pytest.raises(ValueError, match=needs):
        model(ids, labels=ids)
    with pytest.raises(ValueError, match="more than the model's"):
        model(ids)
    assert model(ids[:, :4], labels=ids[:, :4]).loss.isfinite()  # exactly at the limit


def test_fit_names_the_training_sample_past_the_positions() -> None:
    tokenizer = make_wordlevel_tokenizer()
    n = build_context(tokenizer, [Example(t, label) for t, label in EXAMPLES]).num_virtual_tokens
    long_text = " ".join(["good movie"] * 20)
    with pytest.raises(ValueError, match=rf"training sample 2 \(\d+ tokens\) and the context \({n} tokens\) need"):
        fit(_with_positions("gpt2", n + 12), tokenizer, EXAMPLES, train_examples=[*EXAMPLES, (long_text, "positive")],
            train_config=TrainConfig(epochs=1, progress=False), selection=None)


def test_a_model_without_a_position_limit_takes_any_length() -> None:
    tokenizer = make_wordlevel_tokenizer()
    config = build_context(tokenizer, [Example(t, label) for t, label in EXAMPLES])
    model = CPTModel(make_model("bloom"), config)  # ALiBi: no max_position_embeddings
    ids = torch.full((1, 600), 5)
    assert model(ids, labels=ids).loss.isfinite()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(opt_bogus=1), r"unknown CPTConfig option 'opt_bogus'; the options are \["),
        (dict(labels=["positive", "negative", "positive"]), r"labels holds 'positive' twice \(at 0 and 2\)"),
        (dict(labels="np"), "labels must be a list of strings, got 'np'"),
        (dict(labels=["positive", ""]), r"labels\[1\] must be a non-empty string"),
        (dict(labels=[]), "labels is empty"),
    ],
)
def test_fit_refuses_bad_options_before_training(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit(make_model(), make_wordlevel_tokenizer(), EXAMPLES, train_config=TrainConfig(max_steps=1, progress=False), **kwargs)
