import json

import pytest
import torch

from cpt import CPTConfig, TokenRole
from cpt.config import check_trainable, is_label, is_trainable, token_roles


def test_defaults_are_filled_like_peft() -> None:
    config = CPTConfig(cpt_token_ids=[5, 6, 7])
    assert config.cpt_mask == [1, 1, 1]
    assert config.cpt_tokens_type_mask == [1, 1, 1]
    assert config.num_virtual_tokens == 3
    assert config.opt_weighted_loss_type == "none"
    assert config.opt_loss_decay_factor == 1.0
    assert config.opt_projection_epsilon == 0.1
    assert config.opt_projection_format_epsilon == 0.1
    assert CPTConfig().cpt_token_ids == [0]


def test_json_round_trip() -> None:
    config = CPTConfig(
        cpt_token_ids=[5, 6, 7, 8], cpt_tokens_type_mask=[1, 2, 3, 4],
        opt_weighted_loss_type="decay", opt_loss_decay_factor=0.95,
    )
    again = CPTConfig.from_json(config.to_json())
    assert again == config


def test_reads_peft_config_and_ignores_peft_only_keys() -> None:
    data = CPTConfig(cpt_token_ids=[5, 6], cpt_tokens_type_mask=[2, 4]).to_peft_dict(token_dim=32)
    assert data["peft_type"] == "CPT" and data["token_dim"] == 32
    data["some_future_peft_key"] = 1
    config = CPTConfig.from_dict(json.loads(json.dumps(data)))
    assert config.cpt_token_ids == [5, 6] and config.cpt_tokens_type_mask == [2, 4]


def test_tensor_inputs_are_accepted() -> None:
    config = CPTConfig(cpt_token_ids=torch.tensor([5, 6]), cpt_tokens_type_mask=torch.tensor([1, 4]))
    assert config.cpt_token_ids == [5, 6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(cpt_token_ids=[1, 2], cpt_mask=[1]), "same length"),
        (dict(cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1, 2, 3]), "same length"),
        (dict(cpt_token_ids=[]), "cpt_token_ids is empty"),
        (dict(cpt_token_ids=[1], opt_projection_epsilon=-0.1), "opt_projection_epsilon must be"),
        (dict(cpt_token_ids=[1], opt_projection_format_epsilon=float("nan")), "opt_projection_format_epsilon"),
        (dict(cpt_token_ids=[1], opt_loss_decay_factor=0.0), r"opt_loss_decay_factor must be in \(0, 1\]"),
        (dict(cpt_token_ids=[1], opt_loss_decay_factor=1.5), r"opt_loss_decay_factor must be in \(0, 1\]"),
        (dict(cpt_token_ids=[1], opt_weighted_loss_type="exp"), "opt_weighted_loss_type must be one of"),
        (dict(cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1, -1]), "type code below 0: -1 at position 1"),
        (dict(cpt_token_ids=[1, -2]), "negative id"),
        (dict(cpt_token_ids=[1, 2], cpt_mask=[1, 2]), "cpt_mask must hold only 0 and 1"),
        (dict(cpt_token_ids=[1], cpt_mask=[0]), "all zeros"),
        (dict(cpt_token_ids=[1], task_type="SEQ_CLS"), "task_type must be 'CAUSAL_LM'"),
        (dict(cpt_token_ids=[1, 2.5]), r"cpt_token_ids\[1\] must be an integer"),
        (dict(cpt_token_ids="abc"), "must be a list of integers"),
    ],
)
def test_bad_values_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CPTConfig(**kwargs)


def test_wrong_peft_type_and_inconsistent_length_are_refused() -> None:
    with pytest.raises(ValueError, match="peft_type 'LORA'"):
        CPTConfig.from_dict({"peft_type": "LORA", "cpt_token_ids": [1]})
    with pytest.raises(ValueError, match="num_virtual_tokens is 3"):
        CPTConfig.from_dict({"cpt_token_ids": [1], "num_virtual_tokens": 3})


def test_roles_of_type_codes() -> None:
    codes = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0])
    expected = [0, 1, 2, 3, 4, 1, 2, 3, 4, 0]
    assert token_roles(codes).tolist() == expected
    assert is_label(codes).tolist() == [r == TokenRole.LABEL for r in expected]
    assert is_trainable(codes).tolist() == [r in (1, 2, 3) for r in expected]


def test_number_of_examples() -> None:
    assert CPTConfig(cpt_token_ids=[1] * 5, cpt_tokens_type_mask=[1, 2, 4, 5, 8]).num_examples == 2


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        ([1, 2, 4, 9, 10, 12], r"skips example 1: it has codes of example 2 \(9..12\) but none of 5..8"),
        ([5, 6, 8], r"skips example 0"),
        ([1, 2, 5, 6, 3, 4, 8], r"code 3 at position 4 belongs to example 0, but example 1 has already begun"),
        ([1, 4, 2, 0], r"the label of example 0 \(code 4\) at position 1 comes before its input \(code 2\) at position 2"),
        ([1, 2, 4, 5, 8, 6], r"the label of example 1 \(code 8\) at position 4 comes before its input"),
    ],
)
def test_type_codes_follow_the_scheme(codes: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CPTConfig(cpt_token_ids=[3] * len(codes), cpt_tokens_type_mask=codes)


@pytest.mark.parametrize(
    "codes",
    [[1], [0], [1, 2, 3, 4], [2, 4], [1, 2, 0, 3, 4, 0, 5, 6, 7, 8], [2, 1, 3, 4, 3], [0, 1, 0, 2, 3, 4, 4, 0]],
)
def test_valid_codes_are_accepted(codes: list[int]) -> None:
    # [2, 1, 3, 4, 3]: a template with text after its slot ("{} was it", "is {}.") is fine
    assert CPTConfig(cpt_token_ids=[3] * len(codes), cpt_tokens_type_mask=codes).cpt_tokens_type_mask == codes


def test_defaults_and_untrainable_contexts() -> None:
    config = CPTConfig()  # PEFT's defaults build, and can be used as a plain context
    assert config.cpt_tokens_type_mask == [1]
    with pytest.raises(ValueError, match=r"highest type code is 1, not a multiple of 4 .* shifted by 1 .* would become 5"):
        check_trainable(config)  # but training it would target template tokens
    with pytest.raises(ValueError, match="no trainable row"):
        check_trainable(CPTConfig(cpt_token_ids=[1, 2], cpt_tokens_type_mask=[0, 0]))
    with pytest.raises(ValueError, match="no trainable row"):
        check_trainable(CPTConfig(cpt_token_ids=[1, 2, 3], cpt_tokens_type_mask=[4, 4, 4]))
    with pytest.raises(ValueError, match="highest type code is 7"):
        check_trainable(CPTConfig(cpt_token_ids=[1] * 6, cpt_tokens_type_mask=[1, 2, 4, 5, 6, 7]))
    check_trainable(CPTConfig(cpt_token_ids=[1] * 4, cpt_tokens_type_mask=[1, 2, 3, 4]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(opt_projection_epsilon=1e39), r"opt_projection_epsilon must be a number in \[0, 1e\+06\], got 1e\+39"),
        (dict(opt_projection_format_epsilon=True), "opt_projection_format_epsilon must be a number"),
        (dict(opt_loss_decay_factor=True), "opt_loss_decay_factor must be in"),
        (dict(cpt_token_ids=[1, True]), r"cpt_token_ids\[1\] must be an integer, got True"),
        (dict(cpt_token_ids=[2**80]), r"cpt_token_ids\[0\] is out of range"),
        (dict(opt_weighted_loss_type=["none"]), "opt_weighted_loss_type must be one of"),
        (dict(task_type=["CAUSAL_LM"]), "task_type must be 'CAUSAL_LM'"),
        (dict(tokenizer_name_or_path=3), "tokenizer_name_or_path must be a string or None, got 3"),
    ],
)
def test_wrong_types_and_ranges_are_value_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CPTConfig(**kwargs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1]", "a CPTConfig is read from a JSON object, got list"),
        ("{", "not a CPTConfig JSON text"),
        ('{"cpt_token_ids": [1], "num_virtual_tokens": "1"}', "num_virtual_tokens is 1"),
        ('{"cpt_token_ids": [1], "num_virtual_tokens": true}', "num_virtual_tokens is True"),
        ('{"cpt_token_ids": [1], "cpt_token_ids": [2]}', 'the key "cpt_token_ids" is given more than once'),
        ('{"cpt_token_ids": [1], "opt_loss_decay_factor": 1e400}', "the number 1e400 is beyond a float's range"),
    ],
)
def test_from_json_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CPTConfig.from_json(text)
