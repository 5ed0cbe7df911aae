"""Tests of cpt/data.py: rendering, contexts, datasets and collation, on offline tokenizers."""

from __future__ import annotations

import pytest
import torch
from tokenizers_util import make_bpe_tokenizer, make_wordlevel_tokenizer
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from cpt.config import CODES_PER_EXAMPLE, CPTConfig, TokenRole, token_roles
from cpt.data import (
    IGNORE_INDEX,
    CPTCollator,
    CPTDataset,
    Example,
    RenderedExample,
    Template,
    as_example,
    build_context,
    epoch_steps,
    label_token_ids,
    render_context,
    render_example,
    render_query,
    right_pad,
    shift_type_codes,
)

TOKENIZER_MAKERS = {"wordlevel": make_wordlevel_tokenizer, "bpe": make_bpe_tokenizer}

TEMPLATES = {
    "default": Template(),
    # text on both sides of each slot, a custom end token, an example separator
    "suffixes": Template(
        input_template="Q: {} ?",
        output_template="A: {} .",
        intra_separator=" ",
        end_token="\n",
        example_separator="\n",
    ),
    # template pieces tokenized exactly as written, spaces and all
    "literal": Template(attach_space=False),
}

EXAMPLES = [
    Example("the movie was great", "very positive"),  # two-word label: several tokens everywhere
    ("an awful film", "negative"),  # a plain tuple
    Example("a fine story", "positive"),
]
AS_EXAMPLES = [as_example(item) for item in EXAMPLES]


@pytest.fixture(scope="module", params=sorted(TOKENIZER_MAKERS))
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return TOKENIZER_MAKERS[request.param]()


@pytest.fixture(params=sorted(TEMPLATES))
def template(request: pytest.FixtureRequest) -> Template:
    return TEMPLATES[request.param]


def _normalise(tokenizer: PreTrainedTokenizerFast, text: str) -> str:
    """Text as the tokenizer can give it back: word-level decoding loses spacing, BPE does not."""
    if tokenizer.name_or_path == "test-wordlevel":
        return "".join(text.split())
    return text


def _expected_pieces(
    tokenizer: PreTrainedTokenizerFast, template: Template, text: str, label: str
) -> list[tuple[str, int]]:
    """The pieces of a rendered example and their codes, written out by hand from the token types in docs/method.md."""
    input_prefix, input_suffix = template.input_template.split("{}")
    output_prefix, output_suffix = template.output_template.split("{}")
    end = tokenizer.eos_token if template.end_token is None else template.end_token
    if template.attach_space:  # trailing spaces before a slot start the slot's text instead
        text = input_prefix[len(input_prefix.rstrip()):] + text if text else text
        input_prefix = input_prefix.rstrip() if text else input_prefix
        label = output_prefix[len(output_prefix.rstrip()):] + label
        output_prefix = output_prefix.rstrip()
    return [
        (input_prefix, TokenRole.INPUT_TEMPLATE),
        (text, TokenRole.INPUT),
        (input_suffix, TokenRole.INPUT_TEMPLATE),
        (template.intra_separator, TokenRole.SEPARATOR),
        (output_prefix, TokenRole.OUTPUT_TEMPLATE),
        (label, TokenRole.LABEL),
        (output_suffix, TokenRole.OUTPUT_TEMPLATE),
        (end, TokenRole.SEPARATOR),
    ]


def _separator_ids(tokenizer: PreTrainedTokenizerFast, template: Template) -> list[int]:
    if not template.example_separator:
        return []
    return tokenizer.encode(template.example_separator, add_special_tokens=False)


def _assert_pieces_line_up(
    tokenizer: PreTrainedTokenizerFast, rendered: RenderedExample, pieces: list[tuple[str, int]]
) -> None:
    """Walks the rendered tokens piece by piece: ids, codes and decoded text must all match."""
    position = 0
    for piece, code in pieces:
        ids = tokenizer.encode(piece, add_special_tokens=False) if piece else []
        span = slice(position, position + len(ids))
        assert rendered.input_ids[span] == ids, f"ids of piece {piece!r}"
        assert rendered.type_codes[span] == [int(code)] * len(ids), f"codes of piece {piece!r}"
        if ids:
            assert _normalise(tokenizer, tokenizer.decode(rendered.input_ids[span])) == _normalise(
                tokenizer, piece
            )
        position += len(ids)
    assert position == len(rendered), "tokens left over after the last piece"


# ---------------------------------------------------------------------------------------------
# Template


@pytest.mark.parametrize("field", ["input_template", "output_template"])
@pytest.mark.parametrize("bad", ["no slot here", "{} and {}", "{0}"])
def test_template_needs_exactly_one_slot(field: str, bad: str) -> None:
    with pytest.raises(
        ValueError, match=rf"Template\.{field} must contain exactly one '{{}}', got '{bad}'"
    ):
        Template(**{field: bad})


def test_template_fields_must_be_strings() -> None:
    with pytest.raises(ValueError, match=r"Template\.intra_separator must be a string, got 3"):
        Template(intra_separator=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Template\.end_token must be a string or None, got 7"):
        Template(end_token=7)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, [True]])
def test_template_attach_space_must_be_a_bool(value: object) -> None:
    with pytest.raises(ValueError, match=r"^Template\.attach_space must be True or False, got "):
        Template(attach_space=value)  # type: ignore[arg-type]


LONE = "bad \udcff byte"  # what Python makes of a byte that is not UTF-8 (surrogateescape)


@pytest.mark.parametrize("field", ["input_template", "output_template", "intra_separator", "end_token",
                                   "example_separator"])
def test_template_text_must_be_valid_unicode(field: str) -> None:
    value = LONE + " {}" if field.endswith("_template") else LONE
    with pytest.raises(ValueError, match=rf"^Template\.{field} is not valid Unicode: a lone surrogate '\\udcff' at character 4"):
        Template(**{field: value})


@pytest.mark.parametrize("position", ["text", "label"])
def test_examples_with_lone_surrogates_are_named(position: str) -> None:
    tokenizer = make_wordlevel_tokenizer()
    bad = (LONE, "positive") if position == "text" else ("good", "pos\ud800")
    examples = [("good movie", "positive"), bad]
    message = rf"^example at index 1: the {position} is not valid Unicode: a lone surrogate"
    with pytest.raises(ValueError, match=message):
        build_context(tokenizer, examples)
    with pytest.raises(ValueError, match=message):
        CPTDataset(tokenizer, examples)
    with pytest.raises(ValueError, match=rf"^{position} is not valid Unicode"):
        render_example(tokenizer, Template(), *bad)


@pytest.mark.parametrize("examples", [5, None, {"text": "a", "label": "b"}, b"ab"])
def test_examples_must_be_a_sequence(examples: object) -> None:
    with pytest.raises(ValueError, match=r"^examples must be a sequence of examples, got "):
        build_context(make_wordlevel_tokenizer(), examples)  # type: ignore[arg-type]


@pytest.mark.parametrize("template", ["input: {}", {"input_template": "x {}"}, 3])
def test_template_must_be_a_template(template: object) -> None:
    tokenizer = make_wordlevel_tokenizer()
    with pytest.raises(ValueError, match=r"^template must be a cpt\.Template or None, got "):
        build_context(tokenizer, [("good", "positive")], template)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^template must be a cpt\.Template or None, got "):
        render_query(tokenizer, template, "good")  # type: ignore[arg-type]


@pytest.mark.parametrize("tokenizer", [None, "gpt2", object()])
def test_tokenizer_must_be_a_tokenizer(tokenizer: object) -> None:
    with pytest.raises(ValueError, match=r"^tokenizer must be a transformers tokenizer, got "):
        build_context(tokenizer, [("good", "positive")])  # type: ignore[arg-type]


def test_template_is_frozen_and_hashable() -> None:
    template = Template()
    with pytest.raises(AttributeError):
        template.input_template = "x {}"  # type: ignore[misc]
    assert hash(template) == hash(Template())


# ---------------------------------------------------------------------------------------------
# Rendering one example


@pytest.mark.parametrize("text, label", [(e.text, e.label) for e in AS_EXAMPLES])
def test_codes_line_up_with_pieces(
    tokenizer: PreTrainedTokenizerFast, template: Template, text: str, label: str
) -> None:
    rendered = render_example(tokenizer, template, text, label)
    assert len(rendered.input_ids) == len(rendered.type_codes)
    assert set(rendered.type_codes) <= {int(role) for role in TokenRole}
    _assert_pieces_line_up(tokenizer, rendered, _expected_pieces(tokenizer, template, text, label))


def test_tokenizers_differ_where_it_matters() -> None:
    """The two test tokenizers must actually disagree on spaces, or testing both proves little."""
    wordlevel, bpe = make_wordlevel_tokenizer(), make_bpe_tokenizer()
    assert wordlevel.encode(" ", add_special_tokens=False) == []
    assert len(bpe.encode(" ", add_special_tokens=False)) == 1


def test_empty_separator_piece_is_skipped_for_wordlevel() -> None:
    tokenizer = make_wordlevel_tokenizer()
    rendered = render_example(tokenizer, Template(), "a fine story", "positive")
    # " " is zero word-level tokens: no code-0 token between the input and "output:"
    assert rendered.type_codes.count(int(TokenRole.SEPARATOR)) == 1  # only the eos at the end
    assert rendered.input_ids[-1] == tokenizer.eos_token_id


def test_multi_token_label(tokenizer: PreTrainedTokenizerFast, template: Template) -> None:
    label = "very positive"
    ids = label_token_ids(tokenizer, template, label)
    assert len(ids) > 1
    rendered = render_example(tokenizer, template, "the movie was great", label)
    label_positions = [i for i, code in enumerate(rendered.type_codes) if code == TokenRole.LABEL]
    first = label_positions[0]
    assert label_positions == list(range(first, first + len(ids)))  # one contiguous run
    assert [rendered.input_ids[i] for i in label_positions] == ids
    assert _normalise(tokenizer, tokenizer.decode(ids)).strip() == _normalise(tokenizer, label)


def test_rare_word_label_splits_into_many_bpe_tokens() -> None:
    tokenizer = make_bpe_tokenizer()
    ids = label_token_ids(tokenizer, Template(), "xylophone")
    assert len(ids) >= 3
    assert tokenizer.decode(ids) == " xylophone"  # carries the template's space


def test_label_token_ids_match_the_label_span(
    tokenizer: PreTrainedTokenizerFast, template: Template
) -> None:
    for label in ("positive", "negative", "very negative"):
        rendered = render_example(tokenizer, template, "a fine story", label)
        span = [
            i
            for i, code in zip(rendered.input_ids, rendered.type_codes, strict=True)
            if code == TokenRole.LABEL
        ]
        assert span == label_token_ids(tokenizer, template, label)


def test_query_is_a_prefix_of_the_example(
    tokenizer: PreTrainedTokenizerFast, template: Template
) -> None:
    for text in ("the movie was great", ""):
        query = render_query(tokenizer, template, text)
        assert max(query.type_codes) <= TokenRole.OUTPUT_TEMPLATE
        assert query.type_codes[-1] == TokenRole.OUTPUT_TEMPLATE  # ends on "output:"
        for label in ("positive", "very negative"):
            full = render_example(tokenizer, template, text, label)
            label_ids = label_token_ids(tokenizer, template, label)
            assert full.input_ids[: len(query)] == query.input_ids
            assert full.type_codes[: len(query)] == query.type_codes
            assert (
                full.input_ids[len(query) : len(query) + len(label_ids)] == label_ids
            )  # label next


def test_empty_text_renders_without_input_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    rendered = render_example(tokenizer, Template(), "", "positive")
    assert TokenRole.INPUT not in rendered.type_codes
    assert TokenRole.LABEL in rendered.type_codes


def test_braces_in_text_are_plain_text() -> None:
    tokenizer = make_bpe_tokenizer()
    rendered = render_example(tokenizer, Template(), "a {} b {0}", "positive")
    text_ids = [
        i
        for i, c in zip(rendered.input_ids, rendered.type_codes, strict=True)
        if c == TokenRole.INPUT
    ]
    assert tokenizer.decode(text_ids) == " a {} b {0}"


def test_default_end_token_is_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    rendered = render_example(tokenizer, Template(), "a fine story", "positive")
    assert rendered.input_ids[-1] == tokenizer.eos_token_id
    assert rendered.type_codes[-1] == TokenRole.SEPARATOR
    assert rendered.input_ids.count(tokenizer.eos_token_id) == 1


def test_empty_end_token_means_none(tokenizer: PreTrainedTokenizerFast) -> None:
    rendered = render_example(tokenizer, Template(end_token=""), "a fine story", "positive")
    assert rendered.type_codes[-1] == TokenRole.LABEL
    assert tokenizer.eos_token_id not in rendered.input_ids


def test_missing_eos_is_an_error() -> None:
    tokenizer = make_wordlevel_tokenizer(with_eos=False)
    with pytest.raises(
        ValueError, match="Template.end_token is None but the tokenizer has no eos_token"
    ):
        render_example(tokenizer, Template(), "a fine story", "positive")
    # an explicit end token needs no eos
    rendered = render_example(tokenizer, Template(end_token="[PAD]"), "a fine story", "positive")
    assert rendered.input_ids[-1] == tokenizer.pad_token_id


@pytest.mark.parametrize("label", ["", " "])
def test_label_with_no_tokens_is_an_error(label: str) -> None:
    tokenizer = make_wordlevel_tokenizer()  # " " is zero word-level tokens
    with pytest.raises(ValueError, match=rf"label '{label}' tokenizes to no tokens"):
        label_token_ids(tokenizer, Template(), label)
    with pytest.raises(ValueError, match=rf"label '{label}' tokenizes to no tokens"):
        render_example(tokenizer, Template(), "a fine story", label)


def test_non_string_text_or_label_is_an_error() -> None:
    tokenizer = make_bpe_tokenizer()
    with pytest.raises(ValueError, match="text must be a string, got None"):
        render_query(tokenizer, Template(), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label must be a string, got 1"):
        label_token_ids(tokenizer, Template(), 1)  # type: ignore[arg-type]


def test_rendered_example_lengths_must_match() -> None:
    with pytest.raises(
        ValueError, match="input_ids and type_codes must have the same length, got 2 and 1"
    ):
        RenderedExample([1, 2], [1])


# ---------------------------------------------------------------------------------------------
# The context


def test_shift_type_codes_leaves_separators() -> None:
    assert shift_type_codes([1, 2, 0, 3, 4, 0], 8) == [9, 10, 0, 11, 12, 0]
    with pytest.raises(ValueError, match="offset must be >= 0, got -1"):
        shift_type_codes([1], -1)


def test_context_shifts_example_k_by_4k(
    tokenizer: PreTrainedTokenizerFast, template: Template
) -> None:
    context = render_context(tokenizer, EXAMPLES, template)
    separator = _separator_ids(tokenizer, template)
    position = 0
    for k, example in enumerate(AS_EXAMPLES):
        rendered = render_example(tokenizer, template, example.text, example.label)
        span = slice(position, position + len(rendered))
        assert context.input_ids[span] == rendered.input_ids
        expected = [code + CODES_PER_EXAMPLE * k if code else 0 for code in rendered.type_codes]
        assert context.type_codes[span] == expected
        position += len(rendered)
        # the example separator follows every example, the last one too, with code 0
        assert context.input_ids[position : position + len(separator)] == separator
        assert context.type_codes[position : position + len(separator)] == [0] * len(separator)
        position += len(separator)
    assert position == len(context)


def test_build_context_gives_a_valid_config(
    tokenizer: PreTrainedTokenizerFast, template: Template
) -> None:
    config = build_context(
        tokenizer, EXAMPLES, template, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5
    )
    context = render_context(tokenizer, EXAMPLES, template)
    k = len(EXAMPLES)
    assert isinstance(config, CPTConfig)
    assert config.cpt_token_ids == context.input_ids
    assert config.cpt_tokens_type_mask == context.type_codes
    assert config.cpt_mask == [1] * len(context)
    assert config.num_virtual_tokens == len(context)
    assert max(config.cpt_tokens_type_mask) == CODES_PER_EXAMPLE * k
    assert config.num_examples == k
    assert set(config.cpt_tokens_type_mask) - {0} == set(range(1, CODES_PER_EXAMPLE * k + 1))
    assert config.tokenizer_name_or_path == tokenizer.name_or_path
    assert config.opt_weighted_loss_type == "decay"
    assert config.opt_loss_decay_factor == 0.5
    # the roles recovered from the shifted codes are the unshifted codes of each example
    unshifted = []
    for example in AS_EXAMPLES:
        unshifted += render_example(tokenizer, template, example.text, example.label).type_codes
        unshifted += [0] * len(_separator_ids(tokenizer, template))
    assert token_roles(torch.tensor(config.cpt_tokens_type_mask)).tolist() == unshifted
    # the config survives a JSON round trip
    assert CPTConfig.from_json(config.to_json()).to_dict() == config.to_dict()


def test_build_context_default_template_and_name_override() -> None:
    tokenizer = make_bpe_tokenizer()
    config = build_context(
        tokenizer, [("a fine story", "positive")], tokenizer_name_or_path="elsewhere"
    )
    assert config.tokenizer_name_or_path == "elsewhere"
    assert max(config.cpt_tokens_type_mask) == CODES_PER_EXAMPLE
    assert (
        config.cpt_token_ids
        == render_example(tokenizer, Template(), "a fine story", "positive").input_ids
    )


def test_build_context_accepts_any_iterable() -> None:
    tokenizer = make_bpe_tokenizer()
    config = build_context(tokenizer, (e for e in EXAMPLES))
    assert config.num_examples == len(EXAMPLES)


def test_build_context_errors() -> None:
    tokenizer = make_bpe_tokenizer()
    with pytest.raises(ValueError, match="examples is empty: a context needs at least one example"):
        build_context(tokenizer, [])
    with pytest.raises(
        ValueError, match="examples must be a sequence of examples, got the string 'ab'"
    ):
        build_context(tokenizer, "ab")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"build_context makes \['cpt_mask'\] itself"):
        build_context(tokenizer, EXAMPLES, cpt_mask=[1])
    with pytest.raises(
        ValueError, match=r"example at index 1 must be an Example, a \(text, label\) pair or a mapping"
    ):
        build_context(tokenizer, [("a", "positive"), ("only text",)])
    with pytest.raises(ValueError, match="example at index 0 must have string text and label"):
        build_context(tokenizer, [("a", 3.0)])
    with pytest.raises(ValueError, match="example at index 0 has the integer label 3: pass the label names"):
        build_context(tokenizer, [("a", 3)])
    with pytest.raises(ValueError, match="label '' tokenizes to no tokens"):
        build_context(tokenizer, [("a", "")])
    with pytest.raises(ValueError, match="opt_loss_decay_factor must be in"):
        build_context(tokenizer, EXAMPLES, opt_loss_decay_factor=2.0)


# ---------------------------------------------------------------------------------------------
# Dataset and collation


def test_dataset_items_are_rendered_examples(
    tokenizer: PreTrainedTokenizerFast, template: Template
) -> None:
    dataset = CPTDataset(tokenizer, EXAMPLES, template)
    assert len(dataset) == len(EXAMPLES)
    for i, example in enumerate(AS_EXAMPLES):
        rendered = render_example(tokenizer, template, example.text, example.label)
        assert dataset[i] == {"input_ids": rendered.input_ids, "input_type_mask": rendered.type_codes}
        assert max(dataset[i]["input_type_mask"]) == TokenRole.LABEL  # unshifted


def test_dataset_errors() -> None:
    tokenizer = make_bpe_tokenizer()
    lengths = [len(render_example(tokenizer, Template(), e.text, e.label)) for e in AS_EXAMPLES]
    limit = sorted(lengths)[0]
    too_long = next(i for i, n in enumerate(lengths) if n > limit)
    with pytest.raises(
        ValueError,
        match=rf"example {too_long} has {lengths[too_long]} tokens, more than max_length={limit}",
    ):
        CPTDataset(tokenizer, EXAMPLES, max_length=limit)
    assert len(CPTDataset(tokenizer, EXAMPLES, max_length=max(lengths))) == len(EXAMPLES)
    with pytest.raises(ValueError, match="max_length must be an integer >= 1 or None, got 0"):
        CPTDataset(tokenizer, EXAMPLES, max_length=0)
    with pytest.raises(ValueError, match="example 2: label '' tokenizes to no tokens"):
        CPTDataset(tokenizer, [("a", "positive"), ("b", "negative"), ("c", "")])
    with pytest.raises(ValueError, match="example at index 1 must be an Example"):
        CPTDataset(tokenizer, [("a", "positive"), "oops"])


def test_collator_pads_right() -> None:
    pad = 99
    items = [
        {"input_ids": [5, 6, 7], "input_type_mask": [1, 2, 4]},
        {"input_ids": [8], "input_type_mask": [4]},
        {"input_ids": [1, 2, 3, 4, 5], "input_type_mask": [1, 2, 0, 3, 4]},
    ]
    batch = CPTCollator(pad_token_id=pad)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "input_type_mask"}
    for tensor in batch.values():
        assert tensor.shape == (3, 5)
        assert tensor.dtype == torch.long
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, pad, pad],
        [8, pad, pad, pad, pad],
        [1, 2, 3, 4, 5],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [5, 6, 7, IGNORE_INDEX, IGNORE_INDEX],
        [8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        [1, 2, 3, 4, 5],
    ]
    assert batch["input_type_mask"].tolist() == [[1, 2, 4, 0, 0], [4, 0, 0, 0, 0], [1, 2, 0, 3, 4]]


def test_right_pad_lists_and_tensors_alike() -> None:
    padded, mask = right_pad([[5, 6, 7], [8]], 0, multiple=4)  # (2, 4): the longest row, rounded up
    assert padded.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]] and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)
    padded, mask = right_pad(labels, IGNORE_INDEX, multiple=4)
    assert padded.dtype == torch.int32 and padded.tolist() == [[1, 2, 3, IGNORE_INDEX], [4, 5, 6, IGNORE_INDEX]]
    assert mask.dtype == torch.long and mask.tolist() == [[1, 1, 1, 0]] * 2
    assert right_pad(labels, 0)[0].tolist() == labels.tolist()  # a multiple already: nothing added


@pytest.mark.parametrize(
    ("samples", "batch_size", "accumulation", "expected"),
    [(10, 3, 1, (4, 4)), (10, 3, 2, (4, 2)), (10, 3, 3, (4, 2)), (9, 3, 3, (3, 1)), (1, 8, 4, (1, 1))],
)
def test_epoch_steps_count_the_short_last_batch_and_step(samples, batch_size, accumulation, expected) -> None:  # type: ignore[no-untyped-def]
    assert epoch_steps(samples, batch_size, accumulation) == expected


def test_collator_with_dataloader(tokenizer: PreTrainedTokenizerFast) -> None:
    dataset = CPTDataset(tokenizer, EXAMPLES)
    loader = DataLoader(
        dataset, batch_size=len(EXAMPLES), collate_fn=CPTCollator(tokenizer.pad_token_id)
    )
    batch = next(iter(loader))
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert batch["input_ids"].shape == (len(EXAMPLES), max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    padding = batch["attention_mask"] == 0
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert (batch["input_type_mask"][padding] == 0).all()
    assert torch.equal(batch["labels"][~padding], batch["input_ids"][~padding])


def test_collator_errors() -> None:
    with pytest.raises(
        ValueError, match=r"pad_token_id must be an integer, got None \(set tokenizer.pad_token\?\)"
    ):
        CPTCollator(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pad_token_id must be >= 0 and fit int64, got -1"):
        CPTCollator(-1)
    with pytest.raises(ValueError, match="pad_token_id must be >= 0 and fit int64, got 9223372036854775808"):
        CPTCollator(2**63)  # torch.full would overflow
    collate = CPTCollator(0)
    with pytest.raises(ValueError, match="cannot collate an empty list of items"):
        collate([])
    with pytest.raises(
        ValueError, match="item 1 has 2 input_ids but 1 input_type_mask codes; they must match"
    ):
        collate([{"input_ids": [1], "input_type_mask": [1]}, {"input_ids": [1, 2], "input_type_mask": [1]}])
    with pytest.raises(ValueError, match="item 0 is empty"):
        collate([{"input_ids": [], "input_type_mask": []}])
    with pytest.raises(ValueError, match=r"^item 0: input_ids must be a list of integers, got str"):
        collate([{"input_ids": "ab", "input_type_mask": "cd"}])
    with pytest.raises(ValueError, match=r"^item 0: input_type_mask\[1\] must be an integer, got 1\.5"):
        collate([{"input_ids": [1, 2], "input_type_mask": [1, 1.5]}])
    with pytest.raises(ValueError, match=r"^item 1 must be a mapping with input_ids and input_type_mask, got 5"):
        collate([{"input_ids": [1], "input_type_mask": [1]}, 5])
    with pytest.raises(ValueError, match=r"^items must be a sequence of samples, got NoneType"):
        collate(None)  # type: ignore[arg-type]


def test_attached_spaces_give_word_tokens_and_the_same_string() -> None:
    tokenizer = make_bpe_tokenizer()
    attached = render_example(tokenizer, Template(), "the movie was great", "positive")
    literal = render_example(tokenizer, Template(attach_space=False), "the movie was great", "positive")
    assert tokenizer.decode(attached.input_ids) == tokenizer.decode(literal.input_ids)
    label = [i for i, c in zip(attached.input_ids, attached.type_codes) if c == TokenRole.LABEL]
    assert label == tokenizer.encode(" positive", add_special_tokens=False)
    assert tokenizer.encode(" ", add_special_tokens=False)[0] not in label
