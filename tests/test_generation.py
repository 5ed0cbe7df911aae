"""Tests of `cpt.generation`: generation after the cached context, its refusals and its sampling."""

from __future__ import annotations

import pytest
import torch
from test_infer import (  # noqa: F401 (fixtures)
    ARCHS,
    BROKEN,
    DEVICES,
    SUFFIXES,
    TEXTS,
    break_inputs,
    reference_greedy,
    tokenizer,
    trained_model,
)
from tokenizers_util import make_bpe_tokenizer, make_wordlevel_tokenizer
from transformers import PreTrainedTokenizerFast

from cpt.data import Template
from cpt.generation import generate, stop_token_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_greedy_matches_uncached_reference(arch: str, tokenizer: PreTrainedTokenizerFast) -> None:
    model = trained_model(arch, tokenizer)
    texts = TEXTS[:3]
    outputs = generate(model, tokenizer, texts, max_new_tokens=6, do_sample=False)
    assert outputs == [reference_greedy(model, tokenizer, Template(), text, 6) for text in texts]
    cache = model.build_context_cache()
    assert generate(model, tokenizer, texts[0], context_cache=cache, max_new_tokens=6) == outputs[:1]


def test_generate_depends_on_the_trained_context() -> None:
    # the check above would be vacuous if the output ignored the context's trained embeddings
    tokenizer = make_bpe_tokenizer()
    model = trained_model("llama", tokenizer)
    trained = generate(model, tokenizer, TEXTS[:3], max_new_tokens=6)
    with torch.no_grad():
        model.delta.zero_()
    assert generate(model, tokenizer, TEXTS[:3], max_new_tokens=6) != trained


def test_generate_stops_at_the_template_end_token(tokenizer: PreTrainedTokenizerFast) -> None:
    model = trained_model("llama", tokenizer, SUFFIXES)
    end = tokenizer.encode("\n", add_special_tokens=False)
    stops = stop_token_ids(model, tokenizer, SUFFIXES)
    if len(end) == 1:  # the word-level tokenizer drops whitespace: no end token at all
        assert stops == [model.base_model.generation_config.eos_token_id, end[0]]
    outputs = generate(model, tokenizer, TEXTS[:2], template=SUFFIXES, max_new_tokens=6)
    assert outputs == [reference_greedy(model, tokenizer, SUFFIXES, text, 6) for text in TEXTS[:2]]


def test_generate_empty_query(tokenizer: PreTrainedTokenizerFast) -> None:
    bare = Template(input_template="{}", output_template="{}", intra_separator="")
    model = trained_model("llama", tokenizer, bare)  # the context ends with the eos token
    assert generate(model, tokenizer, "", template=bare, max_new_tokens=5) == [
        reference_greedy(model, tokenizer, bare, "", 5)
    ]
    trained_end = Template(input_template="{}", output_template="{} .", intra_separator="", end_token="")
    model = trained_model("llama", tokenizer, trained_end)  # ends with "." (trained)
    with pytest.raises(ValueError, match="text 0 renders to no query tokens"):
        generate(model, tokenizer, [""], template=trained_end, max_new_tokens=5)


def test_generate_samples_with_generation_arguments() -> None:
    tokenizer = make_bpe_tokenizer()
    model = trained_model("gpt2", tokenizer)
    torch.manual_seed(1)
    first = generate(model, tokenizer, TEXTS[:2], max_new_tokens=5, do_sample=True, temperature=0.8, top_k=20)
    torch.manual_seed(1)
    again = generate(model, tokenizer, TEXTS[:2], max_new_tokens=5, do_sample=True, temperature=0.8, top_k=20)
    assert first == again
    assert all(isinstance(text, str) for text in first) and len(first) == 2


@pytest.mark.parametrize(
    "texts, kwargs, message",
    [
        ([], {}, "texts is empty"),
        (["a", None], {}, r"texts\[1\] must be a string"),
        (["a"], {"input_ids": torch.tensor([[1]])}, "generate builds"),
        (["a"], {"past_key_values": None}, "generate builds"),
        (["a"], {"num_return_sequences": 2}, "num_return_sequences must be 1"),
        (["a"], {"num_beams": 2}, r"num_beams must be 1 \(the context's cache holds one sequence\), got 2"),
    ],
)
def test_generate_rejects_bad_arguments(texts, kwargs, message: str) -> None:
    tokenizer = make_wordlevel_tokenizer()
    model = trained_model("llama", tokenizer)
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, texts, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling", [{"do_sample": False}, {"do_sample": True, "top_k": 5}])
def test_generate_refuses_non_finite_scores_naming_the_text(device: str, sampling: dict) -> None:
    from cpt.infer import NonFiniteScoresError

    tokenizer = make_bpe_tokenizer()
    model = trained_model("llama", tokenizer).to(device)
    break_inputs(model, tokenizer, "Ω")
    first = generate(model, tokenizer, ["a fine story"], max_new_tokens=4, **sampling)  # the rest still runs
    with pytest.raises(NonFiniteScoresError, match=r"^text 1 \('boring Ω'\): the model's next-token scores held NaN"):
        generate(model, tokenizer, ["a fine story", BROKEN], max_new_tokens=4, **sampling)
    if not sampling["do_sample"]:
        assert generate(model, tokenizer, ["a fine story"], max_new_tokens=4) == first


@pytest.mark.parametrize("device", DEVICES)
def test_generate_samples_at_both_ends_of_the_temperature_range(device: str) -> None:
    from cpt.infer import TEMPERATURE_RANGE

    tokenizer = make_bpe_tokenizer()
    model = trained_model("llama", tokenizer).to(device)
    with torch.no_grad():
        model.base_model.lm_head.weight.mul_(1e3)  # logits of a real model's size: x / 1e-38 overflows
    low, high = TEMPERATURE_RANGE
    greedy = generate(model, tokenizer, TEXTS[:2], max_new_tokens=5, do_sample=False)
    assert generate(model, tokenizer, TEXTS[:2], max_new_tokens=5, do_sample=True, temperature=low) == greedy
    hot = generate(model, tokenizer, TEXTS[:2], max_new_tokens=5, do_sample=True, temperature=high)
    assert all(isinstance(text, str) for text in hot)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 1e-45}, r"temperature must be a number in \[1.1754943508222875e-38, 3.4028234663852886e\+38"),
        ({"temperature": 0.0}, "temperature must be a number in"),
        ({"temperature": float("nan")}, "temperature must be a number in"),
        ({"temperature": 1e39}, "temperature must be a number in"),
        ({"temperature": "hot"}, "temperature must be a number in"),
        ({"top_p": 1.5}, r"top_p must be a number in \[0, 1\], got 1.5"),
        ({"top_p": float("nan")}, r"top_p must be a number in \[0, 1\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": True}, "top_k must be an integer >= 0"),
    ],
)
def test_generate_refuses_sampling_settings_it_cannot_compute(kwargs: dict, message: str) -> None:
    tokenizer = make_wordlevel_tokenizer()
    model = trained_model("llama", tokenizer)
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, TEXTS[:1], max_new_tokens=2, do_sample=True, **kwargs)
    generate(model, tokenizer, TEXTS[:1], max_new_tokens=2, do_sample=False, **kwargs)  # greedy reads none of them
