"""A second hostile pass over the Python API: inputs that used to give a quietly wrong result or a
traceback, each now one ValueError naming the input (or a right answer)."""

import pytest
import torch
from contexts import context_config, sample_batch
from tiny_models import make_model
from tokenizers_util import make_bpe_tokenizer, make_wordlevel_tokenizer

from cpt import CPTModel, TrainConfig, classify, fit, generate, load_model_and_tokenizer
from cpt.labelled_data import load_dataset
from cpt.data import Example, Template, build_context

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny  # cpt.train.SMALLEST_NORMAL

CONTEXT = [("the movie was great", "positive"), ("an awful film", "negative")]


@pytest.fixture(scope="module")
def wordlevel():
    return make_wordlevel_tokenizer()


@pytest.fixture(scope="module")
def model(wordlevel) -> CPTModel:
    return CPTModel(make_model("llama", vocab_size=len(wordlevel)), build_context(wordlevel, CONTEXT))


@pytest.mark.parametrize(
    "labels",
    [["zzz", "qqq"], ["very positive", "very  positive"], ["positive", "negative", "positive\n"]],
    ids=["both-unknown-words", "spaces-the-tokenizer-drops", "a-trailing-newline"],
)
def test_classify_refuses_labels_that_render_to_the_same_tokens(wordlevel, model, labels) -> None:
    """Such labels tie on every score and the first always won, whatever the model said."""
    with pytest.raises(ValueError, match=r"labels \d \(.*\) and \d \(.*\) render to the same tokens"):
        classify(model, wordlevel, ["a fine story"], labels)


def test_fit_refuses_labels_that_render_to_the_same_tokens(wordlevel) -> None:
    examples = [("the movie was great", "zzz"), ("an awful film", "qqq")]
    with pytest.raises(ValueError, match=r"labels 0 \('zzz'\) and 1 \('qqq'\) render to the same tokens"):
        fit(make_model("llama", vocab_size=len(wordlevel)), wordlevel, examples, train_config=TrainConfig(max_steps=1))


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_naming_the_text() -> None:
    """The BPE tokenizer has 320 ids, the model 300: a text's or label's id above 299 reached the
    embedding lookup (IndexError), though the context's own ids fit."""
    bpe = make_bpe_tokenizer()
    model = CPTModel(make_model("llama", vocab_size=300), build_context(bpe, [("zq", "x"), ("qz", "y")]))
    assert classify(model, bpe, ["zq"], ["x", "y"]).predictions[0] in ("x", "y")
    with pytest.raises(ValueError, match=r"text 1 \('the movie'\) holds token id 3\d\d, outside the model's vocabulary of 300"):
        classify(model, bpe, ["zq", "the movie"], ["x", "y"])
    with pytest.raises(ValueError, match=r"label 1 \(' movie'\) holds token id 3\d\d, outside the model's vocabulary of 300"):
        classify(model, bpe, ["zq"], ["x", " movie"])
    with pytest.raises(ValueError, match=r"text 0 \('the movie'\) holds token id 3\d\d, outside the model's vocabulary of 300"):
        generate(model, bpe, ["the movie"], max_new_tokens=1)


@pytest.mark.parametrize("value", [2, -1, float("nan"), 0.5])
def test_an_attention_mask_of_other_values_than_0_and_1_is_refused(value) -> None:
    """The passes read any non-zero value as a real token: a mask of 2, -1 or NaN was obeyed as
    all ones, a quiet misreading of what it says."""
    model = CPTModel(make_model("llama"), context_config())
    batch = sample_batch(2)
    mask = batch["attention_mask"].float()
    mask[0, 0] = value
    with pytest.raises(ValueError, match="attention_mask must hold 0 .padding. and 1 .token. only, got"):
        model(**{**batch, "attention_mask": mask})
    with pytest.raises(ValueError, match="attention_mask must hold 0"):
        model(batch["input_ids"], mask)
    same = model(**{**batch, "attention_mask": batch["attention_mask"].bool()}).loss  # bool and float 0/1 work
    assert torch.equal(same, model(**batch).loss)


def test_a_batch_on_the_meta_device_or_without_rows_is_refused() -> None:
    model = CPTModel(make_model("llama"), context_config())
    batch = sample_batch(2)
    with pytest.raises(ValueError, match="input_ids is on the meta device"):
        model(**{**batch, "input_ids": batch["input_ids"].to("meta")})
    with pytest.raises(ValueError, match="labels is on the meta device"):
        model(**{**batch, "labels": batch["labels"].to("meta")})
    with pytest.raises(ValueError, match=r"input_ids has no rows \(batch size 0\)"):
        model(batch["input_ids"][:0])  # no labels: the logits path
    with pytest.raises(ValueError, match=r"input_ids has no rows \(batch size 0\)"):
        model(**{name: tensor[:0] for name, tensor in batch.items()})


def test_classify_and_generate_use_the_template_the_model_was_fitted_with(wordlevel) -> None:
    """With ``template=None`` both used the default Template, whatever the context was written
    with: a model fitted with its own template was quietly scored on another prompt."""
    template = Template(input_template="Q: {} ?", output_template="A: {} .", intra_separator=" ")
    model, _ = fit(
        make_model("llama", vocab_size=len(wordlevel)), wordlevel, CONTEXT, template=template,
        train_config=TrainConfig(max_steps=1), selection=None,
    )
    texts, labels = ["a fine story", "boring and too long"], ["positive", "negative"]
    implicit = classify(model, wordlevel, texts, labels).log_likelihoods
    assert torch.equal(implicit, classify(model, wordlevel, texts, labels, template=template).log_likelihoods)
    assert not torch.equal(implicit, classify(model, wordlevel, texts, labels, template=Template()).log_likelihoods)
    greedy = dict(max_new_tokens=3, do_sample=False)
    assert generate(model, wordlevel, texts, **greedy) == generate(model, wordlevel, texts, template=template, **greedy)
    model.task = {"template": ["not", "fields"]}
    with pytest.raises(ValueError, match="the model's task template must be a dict of Template fields"):
        classify(model, wordlevel, texts, labels)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(max_new_tokens=1.5), "max_new_tokens must be an integer, got 1.5"),  # generated 2 tokens
        (dict(max_new_tokens=True), "max_new_tokens must be an integer, got True"),  # generated 1
        (dict(max_new_tokens="3"), "max_new_tokens must be an integer, got '3'"),  # TypeError
        (dict(max_new_tokens=2, num_return_sequences=True), "num_return_sequences must be an integer, got True"),
        (dict(max_new_tokens=2, eos_token_id=10**6), r"eos_token_id holds token id 1000000, outside the model's vocabulary of 37"),
        (dict(max_new_tokens=2, eos_token_id=[2, -1]), r"eos_token_id holds token id -1, outside"),  # a warning, then ignored
        (dict(max_new_tokens=2, forced_eos_token_id=10**6), r"forced_eos_token_id holds token id 1000000"),  # IndexError
        (dict(max_new_tokens=2, generation_config=5), "generation_config must be a transformers GenerationConfig, got 5"),
        (dict(max_new_tokens=2, logits_processor=5), "logits_processor must be a list of callables"),
        (dict(max_new_tokens=2, stopping_criteria=[5]), "stopping_criteria must be a list of callables"),
        (dict(max_new_tokens=2, streamer=5), r"streamer must have put\(\) and end\(\) methods"),
    ],
)
def test_generate_refuses_generation_arguments_it_would_misread(wordlevel, model, arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        generate(model, wordlevel, ["a fine story"], **arguments)


def test_generate_takes_well_formed_generation_arguments(wordlevel, model) -> None:
    from transformers import GenerationConfig

    greedy = generate(model, wordlevel, ["a fine story"], max_new_tokens=2, do_sample=False)
    same = generate(
        model, wordlevel, ["a fine story"], generation_config=GenerationConfig(max_new_tokens=2, do_sample=False),
        logits_processor=[lambda ids, scores: scores], stopping_criteria=[], eos_token_id=[wordlevel.eos_token_id],
    )
    assert same == greedy


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda m: m.save_pretrained("out\0put"), "path"),
        (lambda m: CPTModel.from_pretrained(make_model("llama"), "ad\0apter"), "path"),
        (lambda m: load_dataset("da\0ta.jsonl"), "name_or_path"),
        (lambda m: load_model_and_tokenizer("mo\0del"), "name_or_path"),
    ],
    ids=["save_pretrained", "from_pretrained", "load_dataset", "load_model_and_tokenizer"],
)
def test_a_path_with_a_nul_character_is_refused_naming_the_argument(call, argument) -> None:
    """The OS refuses such a name with a bare "embedded null byte", naming nothing."""
    model = CPTModel(make_model("llama"), context_config())
    with pytest.raises(ValueError, match=f"^{argument} holds a NUL character, which no file name can"):
        call(model)


def test_load_model_and_tokenizer_refuses_a_dtype_that_is_not_floating(tmp_path) -> None:
    """A ``torch.dtype`` went unchecked (only names were), to fail inside transformers."""
    make_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype.*got torch.int8"):
        load_model_and_tokenizer(tmp_path, dtype=torch.int8)


@pytest.fixture(scope="module")
def without_pad(wordlevel):
    """The word-level tokenizer without a pad token."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordlevel.backend_tokenizer, unk_token="[UNK]", eos_token="[EOS]")
    assert tokenizer.pad_token_id is None
    return tokenizer


@pytest.mark.parametrize("added_pad", [False, True], ids=["no-pad-token", "pad-token-outside-the-model"])
def test_fit_and_classify_work_with_a_tokenizer_whose_pad_token_the_model_lacks(wordlevel, without_pad, added_pad) -> None:
    """Padding is masked out, but its id is still looked up: a pad id past the model's
    embeddings gave an IndexError in classify and a refusal in fit; no pad token refused fit."""
    tokenizer = without_pad
    if added_pad:  # at id 37, one past the model's 37 embeddings (added without resizing the model)
        tokenizer = tokenizer.__class__(tokenizer_object=wordlevel.backend_tokenizer, unk_token="[UNK]", eos_token="[EOS]")
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        assert tokenizer.pad_token_id == len(wordlevel)
    examples = CONTEXT + [("a fine story", "positive"), ("boring and too long", "negative")]
    model, result = fit(
        make_model("llama", vocab_size=len(wordlevel)), tokenizer, examples,
        train_config=TrainConfig(max_steps=1, batch_size=4), selection=None,
    )
    texts, labels = ["the", "the movie was great"], ["positive", "very negative"]  # padded queries and labels
    cached = classify(model, tokenizer, texts, labels).log_likelihoods
    torch.testing.assert_close(cached, classify(model, tokenizer, texts, labels, use_cache=False).log_likelihoods)
    same = classify(model, wordlevel, texts, labels).log_likelihoods  # the same ids, with the model's own pad
    torch.testing.assert_close(cached, same)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(learning_rate=1e-320), r"learning_rate must be a finite number in \[1.17"),  # 0 in float32
        (dict(learning_rate=1e-40), r"learning_rate must be a finite number in \[1.17"),  # subnormal: may flush
        (dict(max_grad_norm=1e-45), r"max_grad_norm must be a finite number >= 1.17"),  # clips every gradient to 0
        (dict(weight_decay=3000.0), r"learning_rate \* weight_decay must be at most 1, got 0.001 \* 3000.0"),
    ],
)
def test_train_config_refuses_what_would_train_nothing_or_flip_the_context(wordlevel, fields, message) -> None:
    """Each of these trained "fine": the context never moved (the step or the clipped gradient
    was 0 in float32), or weight decay multiplied it by 1 - 3 = -2 each step."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)
    at_the_bounds = TrainConfig(learning_rate=SMALLEST_NORMAL, max_grad_norm=SMALLEST_NORMAL, weight_decay=1 / SMALLEST_NORMAL / 2)
    assert at_the_bounds.learning_rate * at_the_bounds.weight_decay <= 1


def test_fit_refuses_a_training_example_the_model_cannot_embed_by_its_index() -> None:
    """Only the context was checked up front; a training example with an id past the model's
    embeddings was refused at the first step, as "input_ids holds 319", naming no example."""
    bpe = make_bpe_tokenizer()
    context = [("zq", "x"), ("qz", "y")]  # ids below 300
    with pytest.raises(ValueError, match=r"^train_examples\[1\] holds token id 3\d\d, outside the model's vocabulary of 300"):
        fit(make_model("llama", vocab_size=300), bpe, context, train_examples=[("zq", "x"), ("the movie", "y")],
            train_config=TrainConfig(max_steps=1), selection=None)


def test_a_context_cache_of_another_context_is_refused(wordlevel) -> None:
    """Only the cache's length was checked: one built before the adapter changed, or from another
    model with a context of the same length, quietly scored with that other context."""
    config = build_context(wordlevel, CONTEXT)
    model = CPTModel(make_model("llama", vocab_size=len(wordlevel)), config)
    other = CPTModel(make_model("llama", vocab_size=len(wordlevel), seed=1), config)
    texts, labels = ["a fine story"], ["positive", "negative"]
    cache = model.build_context_cache()
    assert torch.equal(
        classify(model, wordlevel, texts, labels, context_cache=cache).log_likelihoods,
        classify(model, wordlevel, texts, labels).log_likelihoods,
    )
    with pytest.raises(ValueError, match="context_cache was built from another context"):
        classify(other, wordlevel, texts, labels, context_cache=cache)
    with torch.no_grad():
        model.delta.add_(0.5 * model.context.trainable_rows)  # the adapter changes: the cache is stale
    for call in (
        lambda: classify(model, wordlevel, texts, labels, context_cache=cache),
        lambda: generate(model, wordlevel, texts, context_cache=cache, max_new_tokens=1),
        lambda: model.sample_logits(torch.tensor([[3, 4]]), context_cache=cache),
    ):
        with pytest.raises(ValueError, match="context_cache was built from another context"):
            call()
    fresh = classify(model, wordlevel, texts, labels, context_cache=model.build_context_cache()).log_likelihoods
    assert torch.equal(fresh, classify(model, wordlevel, texts, labels).log_likelihoods)


def test_leave_one_out_hides_every_copy_of_the_held_out_text(wordlevel) -> None:
    """With a text twice in the context, holding one copy out left the other in view: the
    example was scored with its own answer in the context, and fit's selection trusted that."""
    from cpt.selection import held_out_log_probs

    examples = [Example(*pair) for pair in [("a fine story", "positive"), ("a fine story", "positive"), *CONTEXT]]
    model = CPTModel(make_model("llama", vocab_size=len(wordlevel)), build_context(wordlevel, examples))
    scored = held_out_log_probs(model, wordlevel, examples, ["positive", "negative"])
    assert scored[0] == scored[1]  # both copies hidden: the same visible context for either


def test_fit_skips_leave_one_out_when_a_label_has_one_distinct_text(wordlevel) -> None:
    """Two copies of one text counted as two examples of its label, so the selection ran with a
    held-out text whose label the rest of the context no longer showed."""
    examples = [("a fine story", "positive"), ("a fine story", "positive"), *CONTEXT[1:], ("boring and too long", "negative")]
    _, result = fit(make_model("llama", vocab_size=len(wordlevel)), wordlevel, examples, train_config=TrainConfig(max_steps=1))
    assert not any("loo_accuracy" in entry for entry in result.eval_history)
