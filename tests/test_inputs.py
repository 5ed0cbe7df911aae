"""`cpt.inputs`: the checks of what a caller hands to a `CPTModel`, called directly. Each bad
input is one ValueError naming the input and the problem; each good one passes untouched. (The
same refusals through `CPTModel`'s forward are in test_api_inputs.py and test_api_hostile.py.)"""

from __future__ import annotations

import pytest
import torch
import transformers
from contexts import sample_batch
from tiny_models import VOCAB, make_model

from cpt.inputs import IGNORE_INDEX, check_base_model, check_batch, check_token_ids


def _ids(*values: int) -> torch.Tensor:
    return torch.tensor([list(values)], dtype=torch.long)  # (1, S)


# ---------------------------------------------------------------------- check_token_ids


def test_ids_inside_the_vocabulary_and_ignored_labels_pass() -> None:
    ids = _ids(0, 5, VOCAB - 1)
    check_token_ids(ids, _ids(IGNORE_INDEX, 5, VOCAB - 1), VOCAB)
    check_token_ids(ids, None, VOCAB)
    check_token_ids(torch.zeros(0, 0, dtype=torch.long), None, VOCAB)  # nothing to read


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool, torch.complex64])
def test_ids_that_are_not_integers_are_refused(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=rf"^input_ids must hold integer token ids, got {dtype}$"):
        check_token_ids(_ids(1, 2).to(dtype), None, VOCAB)
    with pytest.raises(ValueError, match=rf"^labels must hold integer token ids, got {dtype}$"):
        check_token_ids(_ids(1, 2), _ids(1, 2).to(dtype), VOCAB)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integers_other_than_int64_are_refused_not_converted(dtype: torch.dtype) -> None:
    message = rf"^input_ids must be a torch\.long \(int64\) tensor, got {dtype}; convert it with \.long\(\)$"
    with pytest.raises(ValueError, match=message):
        check_token_ids(_ids(1, 2).to(dtype), None, VOCAB)


@pytest.mark.parametrize(
    ("input_ids", "labels", "message"),
    [
        (_ids(3, 96, 103), None, r"^input_ids holds 96, outside the model's vocabulary of 96 \(ids 0\.\.95\)$"),
        (_ids(3, -1), None, r"^input_ids holds -1, outside"),
        (_ids(3, 4), _ids(3, -5), r"^labels holds -5, outside .* \(ids 0\.\.95, or -100 for ignored positions\)$"),
        (_ids(3, 4), _ids(97, 4), r"^labels holds 97, outside"),
        (_ids(IGNORE_INDEX, 4), None, r"^input_ids holds -100"),  # -100 is ignored in labels only
    ],
)
def test_the_first_id_outside_the_vocabulary_is_named(input_ids, labels, message: str) -> None:
    assert VOCAB == 96  # the messages above spell it out
    with pytest.raises(ValueError, match=message):
        check_token_ids(input_ids, labels, VOCAB)


def test_values_off_the_cpu_are_not_read() -> None:
    """Reading a device tensor's range would make the host wait: only the dtype is checked."""
    check_token_ids(torch.empty(2, 3, dtype=torch.long, device="meta"), None, VOCAB)
    with pytest.raises(ValueError, match="must hold integer token ids"):
        check_token_ids(torch.empty(2, 3, device="meta"), None, VOCAB)


# ---------------------------------------------------------------------- check_batch


def _batch() -> dict[str, torch.Tensor]:
    return sample_batch(2)  # (2, 9) input_ids, attention_mask, labels, input_type_mask


def test_a_well_formed_batch_passes_with_or_without_its_optional_tensors() -> None:
    batch = _batch()
    check_batch(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["input_type_mask"])
    check_batch(batch["input_ids"], None, None, None)
    check_batch(batch["input_ids"], batch["attention_mask"].bool(), None, None)  # bool 0/1 reads the same
    check_batch(batch["input_ids"], batch["attention_mask"].float(), None, None)


@pytest.mark.parametrize(
    ("input_ids", "message"),
    [
        ([[1, 2]], r"^input_ids must be a \(batch, seq_len\) tensor, got list$"),
        (torch.ones(3, dtype=torch.long), r"^input_ids must be a \(batch, seq_len\) tensor, got \(3,\)$"),
        (torch.ones(1, 2, 3, dtype=torch.long), r"got \(1, 2, 3\)$"),
        (torch.ones(0, 4, dtype=torch.long), r"^input_ids has no rows \(batch size 0\)$"),
        (torch.ones(2, 0, dtype=torch.long), r"^input_ids has no tokens \(seq_len 0\)$"),
        (torch.ones(2, 3, dtype=torch.long, device="meta"), r"^input_ids is on the meta device, which holds no data"),
    ],
)
def test_input_ids_of_the_wrong_form_are_named(input_ids, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_batch(input_ids, None, None, None)


@pytest.mark.parametrize("name", ["attention_mask", "labels", "input_type_mask"])
def test_each_other_tensor_is_named_for_its_type_shape_and_device(name: str) -> None:
    batch = _batch()
    ids = batch.pop("input_ids")

    def check(value: object) -> None:
        check_batch(ids, **{**batch, name: value})

    with pytest.raises(ValueError, match=rf"^{name} must be a tensor or None, got list$"):
        check(batch[name].tolist())
    with pytest.raises(ValueError, match=rf"^{name} has shape \(2, 8\) but input_ids has shape \(2, 9\)$"):
        check(batch[name][:, 1:])
    with pytest.raises(ValueError, match=rf"^{name} has shape \(1, 9\) but input_ids has shape \(2, 9\)$"):
        check(batch[name][:1])
    with pytest.raises(ValueError, match=rf"^{name} is on the meta device"):
        check(batch[name].to("meta"))


@pytest.mark.parametrize("value", [2.0, -1.0, 0.5, float("nan")])
def test_an_attention_mask_of_values_other_than_0_and_1_is_refused(value: float) -> None:
    batch = _batch()
    mask = batch["attention_mask"].float()
    mask[1, 3] = value
    with pytest.raises(ValueError, match=rf"^attention_mask must hold 0 \(padding\) and 1 \(token\) only, got {value}$"):
        check_batch(batch["input_ids"], mask, None, None)


def test_type_codes_must_be_integers() -> None:
    batch = _batch()
    with pytest.raises(ValueError, match=r"^input_type_mask must hold integer type codes, got torch\.float32$"):
        check_batch(batch["input_ids"], None, None, batch["input_type_mask"].float())
    check_batch(batch["input_ids"], None, None, batch["input_type_mask"].int())  # any integer type reads


# ---------------------------------------------------------------------- check_base_model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_a_causal_lm_gives_its_input_embeddings(arch: str) -> None:
    model = make_model(arch)
    assert check_base_model(model) is model.get_input_embeddings()


def test_an_offloaded_model_on_the_meta_device_is_wrapped() -> None:
    """`accelerate` loads dispatched weights on use: meta weights with a device map are loaded."""
    with torch.device("meta"):
        model = make_model("llama")
    with pytest.raises(ValueError, match=r"^LlamaForCausalLM's weights are on the meta device \(not loaded\)"):
        check_base_model(model)
    model.hf_device_map = {"": "cpu"}
    assert check_base_model(model) is model.get_input_embeddings()


def test_an_encoder_decoder_is_not_a_causal_lm() -> None:
    config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match=r"^T5ForConditionalGeneration is not a causal LM"):
        check_base_model(transformers.T5ForConditionalGeneration(config))


def test_a_model_without_a_head_or_embeddings_is_named() -> None:
    with pytest.raises(ValueError, match=r"^LlamaModel is not a causal LM \(a decoder with a language-model head"):
        check_base_model(make_model("llama").model)
    with pytest.raises(ValueError, match=r"^Sequential has no input embeddings; CPT needs a causal LM$"):
        check_base_model(torch.nn.Sequential(torch.nn.Embedding(4, 2)))
    with pytest.raises(ValueError, match=r"^base_model must be a transformers causal LM \(a torch Module\), got dict$"):
        check_base_model({"model": "gpt2"})


def test_integer_embeddings_are_refused() -> None:
    model = make_model("llama")
    embeddings = model.get_input_embeddings()
    embeddings.weight = torch.nn.Parameter(embeddings.weight.detach().to(torch.int16), requires_grad=False)
    with pytest.raises(ValueError, match=r"^LlamaForCausalLM's input embeddings are torch\.int16; CPT needs"):
        check_base_model(model)
