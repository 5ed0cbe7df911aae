"""Tests of cpt/infer.py: label scoring and generation against the cached context."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, make_model
from tokenizers_util import make_bpe_tokenizer, make_wordlevel_tokenizer
from transformers import PreTrainedTokenizerFast

from cpt.data import Template, build_context, render_example, render_query
from cpt.infer import Classification, classify, generate, stop_token_ids
from cpt.model import CPTModel

TOKENIZER_MAKERS = {"wordlevel": make_wordlevel_tokenizer, "bpe": make_bpe_tokenizer}
ARCHS = ("llama", "gpt2", "opt", "bloom", "gemma2")

CONTEXT = [("the movie was great", "very positive"), ("an awful film", "negative")]
TEXTS = ["a fine story", "boring and too long", "the", "the plot was thin but the actors were good"]
LABELS = ["positive", "negative", "very positive", "pos"]  # multi-token, and a prefix of another
SUFFIXES = Template(  # text on both sides of each slot and a custom end token
    input_template="Q: {} ?", output_template="A: {} .", intra_separator=" ", end_token="\n"
)
TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module", params=sorted(TOKENIZER_MAKERS))
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return TOKENIZER_MAKERS[request.param]()


def tiny_model(arch: str, vocab_size: int) -> torch.nn.Module:
    """A tiny model with the tokenizer's vocabulary size (the BPE one has 320)."""
    return make_model(arch, vocab_size=vocab_size)


def trained_model(
    arch: str, tokenizer: PreTrainedTokenizerFast, template: Template | None = None
) -> CPTModel:
    """A `CPTModel` whose trainable context rows moved far, so a wrong context shows."""
    config = build_context(tokenizer, CONTEXT, template)
    model = CPTModel(tiny_model(arch, len(tokenizer)), config)
    with torch.no_grad():
        model.delta.copy_(torch.randn_like(model.delta) * model.context.trainable_rows)
    return model


def brute_force_log_likelihood(
    model: CPTModel, tokenizer: PreTrainedTokenizerFast, template: Template, text: str, label: str
) -> float:
    """Sum of log p(continuation) from full-sequence logits over ``[context ; example]`` embeds."""
    example = render_example(tokenizer, template, text, label).input_ids
    start = len(render_query(tokenizer, template, text).input_ids)
    embeds = model.base_model.get_input_embeddings()(torch.tensor(example))  # (S, d)
    full = torch.cat([model.context_embeddings(), embeds]).unsqueeze(0)  # (1, N + S, d)
    with torch.no_grad():
        log_probs = model.base_model(inputs_embeds=full).logits[0].float().log_softmax(-1)
    n = model.num_virtual_tokens
    return sum(float(log_probs[n + p - 1, example[p]]) for p in range(start, len(example)))


def brute_force_table(
    model: CPTModel, tokenizer: PreTrainedTokenizerFast, template: Template, texts: list[str]
) -> torch.Tensor:
    """(T, L) `brute_force_log_likelihood` of every text and label of `LABELS`."""
    return torch.tensor(
        [[brute_force_log_likelihood(model, tokenizer, template, t, lab) for lab in LABELS] for t in texts]
    )


def reference_greedy(
    model: CPTModel, tokenizer: PreTrainedTokenizerFast, template: Template, text: str, steps: int
) -> str:
    """Greedy decoding that re-runs ``[context ; query ; new]`` embeds each step, no cache."""
    stops = set(stop_token_ids(model, tokenizer, template))
    ids = render_query(tokenizer, template, text).input_ids
    embed = model.base_model.get_input_embeddings()
    new: list[int] = []
    for _ in range(steps):
        embeds = embed(torch.tensor(ids + new, dtype=torch.long))  # (S, d)
        full = torch.cat([model.context_embeddings(), embeds]).unsqueeze(0)  # (1, N + S, d)
        with torch.no_grad():
            new.append(int(model.base_model(inputs_embeds=full).logits[0, -1].argmax()))
        if new[-1] in stops:
            new.pop()
            break
    return tokenizer.decode(new, skip_special_tokens=True)


# ---------------------------------------------------------------------------- classify


@pytest.mark.parametrize("arch", ARCHS)
def test_classify_matches_brute_force_and_plain_path(arch: str, tokenizer: PreTrainedTokenizerFast) -> None:
    model = trained_model(arch, tokenizer)
    cached = classify(model, tokenizer, TEXTS, LABELS)
    plain = classify(model, tokenizer, TEXTS, LABELS, use_cache=False)
    torch.testing.assert_close(cached.log_likelihoods, plain.log_likelihoods, **TOL)
    expected = brute_force_table(model, tokenizer, Template(), TEXTS)
    torch.testing.assert_close(cached.log_likelihoods, expected, **TOL)
    assert isinstance(cached, Classification)
    assert cached.labels == LABELS
    assert cached.log_likelihoods.shape == cached.probabilities.shape == (len(TEXTS), len(LABELS))
    torch.testing.assert_close(cached.probabilities.sum(-1), torch.ones(len(TEXTS)), rtol=0, atol=1e-6)
    torch.testing.assert_close(cached.probabilities, cached.log_likelihoods.softmax(-1), rtol=0, atol=1e-6)
    assert cached.predictions == [LABELS[j] for j in cached.log_likelihoods.argmax(-1).tolist()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_classify_scores_output_suffix_and_end_token(arch: str, tokenizer: PreTrainedTokenizerFast) -> None:
    model = trained_model(arch, tokenizer, SUFFIXES)
    result = classify(model, tokenizer, TEXTS[:2], LABELS, template=SUFFIXES, batch_size=3)
    expected = brute_force_table(model, tokenizer, SUFFIXES, TEXTS[:2])
    torch.testing.assert_close(result.log_likelihoods, expected, **TOL)
    # a label alone, without its suffix and end token, would score differently
    label_only = Template(SUFFIXES.input_template, "A: {}", SUFFIXES.intra_separator, end_token="")
    assert not torch.allclose(
        classify(model, tokenizer, TEXTS[:2], LABELS, template=label_only).log_likelihoods,
        result.log_likelihoods,
    )


def test_classify_is_batch_invariant(tokenizer: PreTrainedTokenizerFast) -> None:
    model = trained_model("llama", tokenizer)
    results = [classify(model, tokenizer, TEXTS, LABELS, batch_size=b) for b in (1, 3, 8, 100)]
    for other in results[1:]:
        torch.testing.assert_close(other.log_likelihoods, results[0].log_likelihoods, **TOL)
        assert other.predictions == results[0].predictions


def test_classify_builds_the_context_cache_once(
    tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = trained_model("llama", tokenizer)
    cache = model.build_context_cache()
    calls: list[int] = []
    build = model.build_context_cache
    monkeypatch.setattr(model, "build_context_cache", lambda: calls.append(1) or build())
    reference = classify(model, tokenizer, TEXTS, LABELS, batch_size=1)  # many batches
    assert len(calls) == 1
    given = classify(model, tokenizer, TEXTS, LABELS, batch_size=2, context_cache=cache)
    assert len(calls) == 1  # the given cache is used as it is
    torch.testing.assert_close(given.log_likelihoods, reference.log_likelihoods, **TOL)
    classify(model, tokenizer, TEXTS, LABELS)
    generate(model, tokenizer, TEXTS[:1], max_new_tokens=2)
    assert len(calls) == 1  # the adapter has not changed: the model keeps its cache
    with torch.no_grad():
        model.delta.mul_(0.5)  # as an optimizer step would
    changed = classify(model, tokenizer, TEXTS, LABELS)
    assert len(calls) == 2
    assert not torch.allclose(changed.log_likelihoods, reference.log_likelihoods)


@pytest.mark.parametrize("use_cache", [True, False])
def test_classify_empty_query(tokenizer: PreTrainedTokenizerFast, use_cache: bool) -> None:
    # nothing before the label: its first token is scored from the context's last position
    bare = Template(input_template="{}", output_template="{}", intra_separator="")
    model = trained_model("llama", tokenizer, bare)
    assert render_query(tokenizer, bare, "").input_ids == []
    result = classify(model, tokenizer, ["", "a fine story"], LABELS, template=bare, use_cache=use_cache)
    expected = brute_force_table(model, tokenizer, bare, ["", "a fine story"])
    torch.testing.assert_close(result.log_likelihoods, expected, **TOL)


@pytest.mark.parametrize(
    "texts, labels, kwargs, message",
    [
        (TEXTS, [], {}, "labels is empty"),
        ([], LABELS, {}, "texts is empty"),
        (TEXTS, ["positive", "negative", "positive"], {}, "'positive' twice"),
        ("a fine story", LABELS, {}, "texts must be a sequence of strings"),
        (TEXTS, ["positive", 3], {}, r"labels\[1\] must be a string"),
        (TEXTS, LABELS, {"batch_size": 0}, "batch_size must be an integer >= 1"),
        (TEXTS, LABELS, {"batch_size": 2.0}, "batch_size must be an integer >= 1"),
        (TEXTS, ["positive", ""], {}, r"label 1 \(''\).*no tokens"),
    ],
)
def test_classify_rejects_bad_arguments(
    tokenizer: PreTrainedTokenizerFast, texts, labels, kwargs, message: str
) -> None:
    model = trained_model("llama", tokenizer)
    with pytest.raises(ValueError, match=message):
        classify(model, tokenizer, texts, labels, **kwargs)


def test_classify_rejects_a_text_longer_than_the_model(tokenizer: PreTrainedTokenizerFast) -> None:
    model = trained_model("gpt2", tokenizer)  # 512 learned positions
    texts = ["a fine story", "the " * 600]
    with pytest.raises(ValueError, match=r"text 1 .*more than the model's 512"):
        classify(model, tokenizer, texts, LABELS)
    with pytest.raises(ValueError, match=r"text 1 .*more than the model's 512"):
        generate(model, tokenizer, texts, max_new_tokens=1)


def test_classify_rejects_a_cache_of_another_context(tokenizer: PreTrainedTokenizerFast) -> None:
    model = trained_model("llama", tokenizer)
    other = CPTModel(tiny_model("llama", len(tokenizer)), build_context(tokenizer, CONTEXT[:1]))
    with pytest.raises(ValueError, match="context_cache holds"):
        classify(model, tokenizer, TEXTS, LABELS, context_cache=other.build_context_cache())
    with pytest.raises(ValueError, match="context_cache holds"):
        generate(model, tokenizer, TEXTS, context_cache=other.build_context_cache())


# ---------------------------------------------------------------------------- generate


# ---------------------------------------------------------------------------------------- graphs


def test_bucketed_batches_score_the_same(monkeypatch, tokenizer: PreTrainedTokenizerFast) -> None:
    """What classify does for CUDA graphs (pad to 8 tokens, logits from a multiple of 8), checked
    on the CPU with eager passes standing in for the replays."""
    from dataclasses import replace

    import cpt.infer as infer
    from cpt import passes

    model = trained_model("llama", tokenizer, SUFFIXES)
    reference = classify(model, tokenizer, TEXTS, LABELS, template=SUFFIXES, batch_size=3)
    calls = []

    def eager_stand_in(ids, mask, positions, *, context_cache):  # type: ignore[no-untyped-def]
        calls.append((ids.shape[1], int(positions[0])))
        return model.sample_logits(ids, mask, context_cache=context_cache, positions=positions)

    facts = passes.facts
    monkeypatch.setattr(passes, "facts", lambda *args: replace(facts(*args), device_type="cuda"))  # the plan: graphs
    monkeypatch.setattr(infer, "GraphedLogits", lambda *args, **kwargs: eager_stand_in)
    bucketed = classify(model, tokenizer, TEXTS, LABELS, template=SUFFIXES, batch_size=3)
    assert calls and all(length % infer.SEQ_BUCKET == 0 and first % infer.SEQ_BUCKET == 0 for length, first in calls)
    assert bucketed.predictions == reference.predictions
    torch.testing.assert_close(bucketed.log_likelihoods, reference.log_likelihoods, **TOL)


def test_classify_refuses_graphs_where_they_cannot_run(tokenizer: PreTrainedTokenizerFast) -> None:
    model = trained_model("llama", tokenizer)
    with pytest.raises(ValueError, match="cuda_graphs is on but the model is not on a CUDA device"):
        classify(model, tokenizer, TEXTS[:1], LABELS, cuda_graphs="on")
    with pytest.raises(ValueError, match="cuda_graphs is on but the context is neither shared nor cached"):
        classify(model, tokenizer, TEXTS[:1], LABELS, use_cache=False, cuda_graphs="on")
    assert classify(model, tokenizer, TEXTS[:1], LABELS, cuda_graphs="auto").predictions  # auto: eager here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_classify_with_graphs_matches_eager_on_cuda(tokenizer: PreTrainedTokenizerFast) -> None:
    model = trained_model("llama", tokenizer, SUFFIXES)
    model.base_model.set_attn_implementation("sdpa")  # eager attention cannot be captured
    model.cuda()
    texts = TEXTS * 4  # shapes repeat, so some are captured (on their second call)
    eager = classify(model, tokenizer, texts, LABELS, template=SUFFIXES, batch_size=4, cuda_graphs="off")
    graphed = classify(model, tokenizer, texts, LABELS, template=SUFFIXES, batch_size=4, cuda_graphs="on")
    assert graphed.predictions == eager.predictions
    torch.testing.assert_close(graphed.log_likelihoods, eager.log_likelihoods, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ more contexts and models


@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - set(ARCHS)))
def test_cached_scoring_matches_the_plain_path_on_other_architectures(arch: str) -> None:
    """The cached context against re-running ``[context ; query ; label]`` per pair, on the
    architectures the brute-force test leaves out. Queries of several lengths, one empty."""
    tokenizer = make_bpe_tokenizer()
    model = trained_model(arch, tokenizer, SUFFIXES)
    texts = [*TEXTS, ""]
    cached = classify(model, tokenizer, texts, LABELS, template=SUFFIXES, batch_size=5)
    plain = classify(model, tokenizer, texts, LABELS, template=SUFFIXES, use_cache=False)
    torch.testing.assert_close(cached.log_likelihoods, plain.log_likelihoods, **TOL)


def test_cached_scoring_with_masked_context_positions(tokenizer: PreTrainedTokenizerFast) -> None:
    from dataclasses import replace as dataclass_replace

    config = build_context(tokenizer, CONTEXT)
    mask = list(config.cpt_mask)
    mask[1] = mask[3] = 0  # two context positions no one attends to
    model = CPTModel(tiny_model("llama", len(tokenizer)), dataclass_replace(config, cpt_mask=mask))
    with torch.no_grad():
        model.delta.copy_(torch.randn_like(model.delta) * model.context.trainable_rows)
    cached = classify(model, tokenizer, TEXTS, LABELS, batch_size=3)
    plain = classify(model, tokenizer, TEXTS, LABELS, use_cache=False)
    torch.testing.assert_close(cached.log_likelihoods, plain.log_likelihoods, **TOL)


@pytest.mark.parametrize("arch", ["llama", "bloom", "opt"])
def test_classify_runs_each_query_once_with_the_cache(monkeypatch, arch: str) -> None:
    import cpt.infer as infer

    tokenizer = make_bpe_tokenizer()
    model = trained_model(arch, tokenizer, SUFFIXES)
    calls = []
    real = infer._score_by_query
    monkeypatch.setattr(infer, "_score_by_query", lambda *args: calls.append(1) or real(*args))
    texts = [*TEXTS, "", "a"]  # an empty query beside others in one batch
    cached = classify(model, tokenizer, texts, LABELS, template=SUFFIXES, batch_size=12)
    assert calls == [1]
    expected = brute_force_table(model, tokenizer, SUFFIXES, texts)
    torch.testing.assert_close(cached.log_likelihoods, expected, **TOL)


# ------------------------------------------------------------ non-finite scores and sampling bounds

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
BROKEN = "boring Ω"  # its bytes "Ω" appear in no other text, label, template or context


def break_inputs(model: CPTModel, tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    """NaN input embeddings for the tokens of ``text``: only the sequences holding them turn NaN
    (llama's output layer is not tied to its embeddings)."""
    with torch.no_grad():
        model.base_model.get_input_embeddings().weight[tokenizer.encode(text, add_special_tokens=False)] = torch.nan


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_classify_refuses_non_finite_scores_naming_the_text(device: str, use_cache: bool) -> None:
    from cpt.infer import NonFiniteScoresError

    tokenizer = make_bpe_tokenizer()
    model = trained_model("llama", tokenizer).to(device)
    texts = ["a fine story", BROKEN, "the"]
    assert classify(model, tokenizer, texts, LABELS, use_cache=use_cache).predictions  # sound before
    break_inputs(model, tokenizer, "Ω")
    message = r"^text 1 \('boring Ω'\): the model's label scores are NaN"
    with pytest.raises(NonFiniteScoresError, match=message) as info:
        classify(model, tokenizer, texts, LABELS, use_cache=use_cache, batch_size=2)
    assert isinstance(info.value, ValueError) and (info.value.index, info.value.text) == (1, BROKEN)


def test_classify_refuses_infinite_logits() -> None:
    tokenizer = make_bpe_tokenizer()
    model = trained_model("llama", tokenizer)
    with torch.no_grad():
        model.base_model.lm_head.weight.mul_(torch.inf)  # every logit +-inf (or NaN)
    with pytest.raises(ValueError, match=r"^text 0 \('the plot was thin but the acto'\.\.\.\): .*NaN or infinite"):
        classify(model, tokenizer, [TEXTS[3], TEXTS[0]], LABELS)




@pytest.mark.parametrize("use_cache", [True, False], ids=["each query once", "each pair a sequence"])
def test_progress_counts_every_text_once_on_either_scorer(use_cache: bool, capsys) -> None:
    tokenizer = make_wordlevel_tokenizer()
    model = trained_model("llama", tokenizer)
    quiet = classify(model, tokenizer, TEXTS, LABELS, use_cache=use_cache, batch_size=3)
    assert capsys.readouterr().err == ""
    shown = classify(model, tokenizer, TEXTS, LABELS, use_cache=use_cache, batch_size=3, progress=True)
    bar = capsys.readouterr().err
    assert "scoring" in bar and f"{len(TEXTS)}/{len(TEXTS)}" in bar and f"{len(TEXTS) + 1}/" not in bar
    assert torch.equal(shown.log_likelihoods, quiet.log_likelihoods)
