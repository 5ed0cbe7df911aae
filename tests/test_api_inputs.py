"""Bad API input: one ValueError naming the problem, before any kernel or training runs."""

import json

import pytest
import torch
from contexts import context_config, sample_batch
from tiny_models import make_model
from tokenizers_util import make_wordlevel_tokenizer

from cpt import CPTConfig, CPTModel, TrainConfig, classify, fit, generate
from cpt.adapter import CPT_CONFIG_NAME
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
        (dict(labels=["positive"], examples=EXAMPLES[:1]), r"the label set \['positive'\] has one label"),
        (dict(examples=[EXAMPLES[0], ("great film", "positive")]), r"the label set \['positive'\] has one label"),
    ],
)
def test_fit_refuses_bad_options_before_training(kwargs: dict, message: str) -> None:
    examples = kwargs.pop("examples", EXAMPLES)
    with pytest.raises(ValueError, match=message):
        fit(make_model(), make_wordlevel_tokenizer(), examples, train_config=TrainConfig(max_steps=1, progress=False), **kwargs)


# ---------------------------------------------------------------------- strict types


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: {**b, "input_ids": b["input_ids"].int()}, r"^input_ids must be a torch\.long \(int64\) tensor, got torch\.int32"),
        (lambda b: {**b, "input_ids": b["input_ids"].to(torch.uint8)}, r"^input_ids must be a torch\.long .*got torch\.uint8"),
        (lambda b: {**b, "labels": b["labels"].int()}, r"^labels must be a torch\.long \(int64\) tensor, got torch\.int32"),
        (lambda b: {**b, "attention_mask": b["attention_mask"].tolist()}, r"^attention_mask must be a tensor or None, got list"),
        (lambda b: {**b, "input_type_mask": b["input_type_mask"].float()}, r"^input_type_mask must hold integer type codes"),
    ],
)
def test_token_tensors_of_the_wrong_kind(change, message: str) -> None:
    model = CPTModel(make_model("llama"), context_config())
    with pytest.raises(ValueError, match=message):
        model(**change(sample_batch(2)))


def _int8_embeddings() -> torch.nn.Module:
    base_model = make_model("llama")
    embeddings = base_model.get_input_embeddings()
    embeddings.weight = torch.nn.Parameter(embeddings.weight.detach().to(torch.int8), requires_grad=False)
    return base_model


def _on_meta() -> torch.nn.Module:
    with torch.device("meta"):
        return make_model("llama")


def _masked_lm() -> torch.nn.Module:
    import transformers

    config = transformers.BertConfig(vocab_size=96, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    return transformers.BertForMaskedLM(config)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: make_model("llama").model, r"^LlamaModel is not a causal LM \(a decoder with a language-model head"),
        (_masked_lm, r"^BertForMaskedLM is not a causal LM"),
        (_int8_embeddings, r"^LlamaForCausalLM's input embeddings are torch\.int8; CPT needs floating-point"),
        (_on_meta, r"^LlamaForCausalLM's weights are on the meta device \(not loaded\)"),
        (lambda: "gpt2", r"^base_model must be a transformers causal LM \(a torch Module\), got str"),
        (lambda: torch.nn.Linear(2, 2), r"^Linear has no input embeddings"),
    ],
)
def test_a_base_model_cpt_cannot_wrap(make, message: str) -> None:
    base_model = make()
    with pytest.raises(ValueError, match=message):
        CPTModel(base_model, context_config())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(compile_projection="no"), r"^compile_projection must be one of \('auto', 'on', 'off'\), got 'no'"),
        (dict(compile_projection=True), r"^compile_projection=True is no longer accepted: write compile_projection='on'"),
        (dict(activation_checkpointing="no"), r"^activation_checkpointing must be True or False, got 'no'"),
        (dict(activation_checkpointing=1), r"^activation_checkpointing must be True or False, got 1"),
    ],
)
def test_cpt_model_options_of_the_wrong_type(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CPTModel(make_model("llama"), context_config(), **kwargs)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({10: 1, 11: 1}, r"^cpt_token_ids must be a list of integers, got dict"),
        ({10, 11}, r"^cpt_token_ids must be a list of integers, got set"),
        ([10.0, 11.0], r"^cpt_token_ids\[0\] must be an integer, got 10\.0"),
        (torch.tensor([10.0, 11.0]), r"^cpt_token_ids must be a 1-D integer tensor, got 1-D torch\.float32"),
        ([10, 2**80], r"^cpt_token_ids\[1\] is out of range"),
    ],
)
def test_token_ids_of_the_wrong_type_are_not_converted(values, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CPTConfig(cpt_token_ids=values)


def _saved(tmp_path) -> CPTModel:
    tokenizer = make_wordlevel_tokenizer()
    model, _ = fit(make_model(), tokenizer, EXAMPLES, train_config=TrainConfig(max_steps=1, progress=False),
                   selection=None)
    return model


@pytest.mark.parametrize("bad", ["no", 0, None, [False]])
def test_a_saved_attach_space_of_another_type_is_refused(tmp_path, bad) -> None:
    model = _saved(tmp_path)
    model.save_pretrained(tmp_path / "a")
    meta_path = tmp_path / "a" / CPT_CONFIG_NAME
    meta = json.loads(meta_path.read_text())
    meta["task"]["template"]["attach_space"] = bad
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"field 'task\.template': Template\.attach_space must be True or False"):
        CPTModel.from_pretrained(model.base_model, tmp_path / "a")


TOKENIZER = make_wordlevel_tokenizer()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(base_model=None), r"^base_model must be a transformers causal LM"),
        (dict(tokenizer=None), r"^tokenizer must be a transformers tokenizer, got NoneType"),
        (dict(examples=5), r"^examples must be a sequence of examples, got int"),
        (dict(examples=[("good", "positive"), ("bad \udcff", "negative")]), r"^example at index 1: the text is not valid Unicode"),
        (dict(train_examples=7), r"^train_examples must be a sequence of examples, got int"),
        (dict(template="input: {}"), r"^template must be a cpt\.Template or None, got str"),
        (dict(labels=["positive", "neg\ud800"]), r"^labels\[1\] is not valid Unicode"),
        (dict(train_config={"epochs": 1}), r"^train_config must be a TrainConfig, got dict"),
        (dict(eval_fn="accuracy"), r"^eval_fn must be callable or None, got str"),
        (dict(checkpoint_dir=5), r"^checkpoint_dir must be a non-empty path \(a str or os\.PathLike\), got 5"),
        (dict(resume_from=""), r"^resume_from must be a non-empty path"),
        (dict(model_kwargs=[("context_sharing", "on")]), r"^model_kwargs must be a dict, got list"),
        (dict(selection=["leave-one-out"]), r"^selection must be one of"),
    ],
)
def test_fit_refuses_arguments_of_the_wrong_type(kwargs: dict, message: str) -> None:
    args = dict(base_model=make_model(), tokenizer=TOKENIZER, examples=EXAMPLES)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        fit(args.pop("base_model"), args.pop("tokenizer"), args.pop("examples"),
            train_config=args.pop("train_config", TrainConfig(max_steps=1, progress=False)), **args)


@pytest.fixture(scope="module")
def tiny_cpt() -> CPTModel:
    config = build_context(TOKENIZER, [Example(t, label) for t, label in EXAMPLES])
    return CPTModel(make_model(), config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(model=None), r"^model must be a CPTModel, got NoneType"),
        (dict(model=make_model()), r"^model must be a CPTModel, got LlamaForCausalLM"),
        (dict(tokenizer="gpt2"), r"^tokenizer must be a transformers tokenizer, got str"),
        (dict(texts=5), r"^texts must be a sequence of strings, got int"),
        (dict(texts=["good", "bad \udcff"]), r"^texts\[1\] is not valid Unicode: a lone surrogate '\\udcff' at character 4"),
        (dict(labels=["positive", "neg\ud800"]), r"^labels\[1\] is not valid Unicode"),
        (dict(template={"input_template": "x {}"}), r"^template must be a cpt\.Template or None, got dict"),
        (dict(calibrate="yes"), r"^calibrate must be True or False, got 'yes'"),
        (dict(use_cache="no"), r"^use_cache must be True or False, got 'no'"),
        (dict(context_cache="cache"), r"^context_cache must be a ContextCache or None, got str"),
        (dict(labels=["positive"]), r"^labels holds 1 label: a classification needs at least two"),
    ],
)
def test_classify_refuses_arguments_of_the_wrong_type(tiny_cpt, kwargs: dict, message: str) -> None:
    args = dict(model=tiny_cpt, tokenizer=TOKENIZER, texts=["good"], labels=["positive", "negative"])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        classify(args.pop("model"), args.pop("tokenizer"), args.pop("texts"), args.pop("labels"), **args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(model="model"), r"^model must be a CPTModel, got str"),
        (dict(texts="bad \udcff"), r"^texts\[0\] is not valid Unicode"),
        (dict(texts=3), r"^texts must be a sequence of strings, got int"),
        (dict(template="input: {}"), r"^template must be a cpt\.Template or None, got str"),
        (dict(context_cache=[]), r"^context_cache must be a ContextCache or None, got list"),
    ],
)
def test_generate_refuses_arguments_of_the_wrong_type(tiny_cpt, kwargs: dict, message: str) -> None:
    args = dict(model=tiny_cpt, tokenizer=TOKENIZER, texts=["good"])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(args.pop("model"), args.pop("tokenizer"), args.pop("texts"), max_new_tokens=1, **args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(path=5), r"^path must be a non-empty path \(a str or os\.PathLike\), got 5"),
        (dict(path=None), r"^path must be a non-empty path"),
        (dict(revision=3), r"^revision must be a string or None, got 3"),
        (dict(context_sharing="on", bogus=1), r"^unknown CPTModel option 'bogus'; the options are \["),
        (dict(base_model=None), r"^base_model must be a transformers causal LM"),
    ],
)
def test_from_pretrained_refuses_arguments_of_the_wrong_type(tmp_path, tiny_cpt, kwargs: dict, message: str) -> None:
    tiny_cpt.save_pretrained(tmp_path / "a")
    args = dict(base_model=tiny_cpt.base_model, path=tmp_path / "a")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        CPTModel.from_pretrained(args.pop("base_model"), args.pop("path"), **args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_items_in_batch=10**400), r"^num_items_in_batch must be a finite number >= 1, got 1000"),
        (dict(shift_labels=[1, 2]), r"^shift_labels must be a tensor or None, got list"),
    ],
)
def test_trainer_arguments_of_the_wrong_type(kwargs: dict, message: str) -> None:
    model = CPTModel(make_model("llama"), context_config())
    with pytest.raises(ValueError, match=message):
        model(**sample_batch(2), **kwargs)


@pytest.mark.parametrize("path", [5, None, "", b"adapter"])
def test_save_pretrained_needs_a_path(tiny_cpt, path) -> None:
    with pytest.raises(ValueError, match=r"^path must be a non-empty path \(a str or os\.PathLike\)"):
        tiny_cpt.save_pretrained(path)


@pytest.mark.parametrize("rtol", ["x", float("nan"), -1.0])
def test_is_projected_needs_a_tolerance(tiny_cpt, rtol) -> None:
    with pytest.raises(ValueError, match=r"^rtol must be a finite number >= 0"):
        tiny_cpt.is_projected(rtol)


def test_content_free_inputs_must_be_a_sequence(tiny_cpt) -> None:
    from cpt.infer import content_free_prior

    with pytest.raises(ValueError, match=r"^inputs must be a sequence of strings, got int"):
        content_free_prior(tiny_cpt, TOKENIZER, ["positive", "negative"], inputs=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(model=None), r"^model must be a CPTModel, got NoneType"),
        (dict(dataset=None), r"^dataset must be indexable samples with a length, got NoneType"),
        (dict(collator="pad"), r"^collator must be callable, got str"),
        (dict(eval_fn="accuracy"), r"^eval_fn must be callable, got str"),
        (dict(checkpoint_dir=5), r"^checkpoint_dir must be a non-empty path"),
        (dict(resume_from=5), r"^resume_from must be a non-empty path"),
    ],
)
def test_train_refuses_arguments_of_the_wrong_type(tiny_cpt, kwargs: dict, message: str) -> None:
    from cpt.data import CPTCollator, CPTDataset
    from cpt.train import train

    args = dict(model=tiny_cpt, dataset=CPTDataset(TOKENIZER, EXAMPLES), config=TrainConfig(max_steps=1, progress=False),
                collator=CPTCollator(0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        train(args.pop("model"), args.pop("dataset"), args.pop("config"), **args)


def test_adapter_functions_refuse_arguments_of_the_wrong_type() -> None:
    from cpt.adapter import adapter_format, save_adapter

    with pytest.raises(ValueError, match=r"^model must be a CPTModel, got str"):
        save_adapter("model", "adapter")
    with pytest.raises(ValueError, match=r"^path must be a non-empty path"):
        adapter_format(5)


@pytest.mark.parametrize(("ids", "kind"), [({2: "end"}, "dict"), ({2, 3}, "set"), ("2", "str"), (2.0, "float")])
def test_generation_stop_ids_are_not_read_by_their_keys(tiny_cpt, ids, kind: str) -> None:
    with pytest.raises(ValueError, match=rf"^eos_token_id must be a list of integers, got {kind}"):
        generate(tiny_cpt, TOKENIZER, ["good"], max_new_tokens=2, eos_token_id=ids)
    assert len(generate(tiny_cpt, TOKENIZER, ["good"], max_new_tokens=2, eos_token_id=[2, 3])) == 1
