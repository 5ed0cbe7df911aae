"""Templates to a CPT context, training samples and batches.

Context-aware Prompt Tuning (Blau et al., "Context-aware Prompt Tuning: Advancing In-Context
Learning with Adversarial Methods", arXiv 2410.17222) learns the embeddings of a few-shot context.
Every token of that context carries a type code saying what it is - template, input text,
label or separator - and so how it may be trained. This module renders labelled examples with a
`Template` into token ids and type codes, concatenates K of them into a context (`build_context`),
and turns further examples into right-padded training batches (`CPTDataset`, `CPTCollator`).

Rendering one example, piece by piece::

    input prefix | text | input suffix | intra sep. | output prefix | label | output suffix | end
         1       |  2   |      1       |     0      |       3       |   4   |       3       |  0

Each piece is tokenized on its own with ``add_special_tokens=False`` (no BOS is added) and empty
pieces are skipped, so every token has exactly one code. Tokenizing pieces apart can differ from
tokenizing the joined string: with a GPT-2 style tokenizer, ``"output: "`` followed by
``"positive"`` gives ``[":", " ", "positive"]`` rather than ``[":", " positive"]``. So by default
(``Template.attach_space``) the spaces that end a template's text before ``{}`` are written as
the start of the slot's text instead: ``"output:"`` then ``" positive"``, the tokens the model saw
in pre-training. The rendered string is the same either way.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from cpt._fields import as_list, check_bool, check_text, int_list, is_int, show
from cpt.config import CODES_PER_EXAMPLE, IGNORE_INDEX, CPTConfig, TokenRole

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SLOT = "{}"
"""The placeholder that a template's text or label replaces; exactly one per template."""

_REPR_MAX_CHARS = 200  # how much of a bad example an error message quotes
_CONTEXT_FIELDS = ("cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask")


@dataclass(frozen=True)
class Example:
    """One labelled example of a few-shot task.

    Args:
        text: the input text; may be empty (the example then has no input-text tokens).
        label: the expected output; must tokenize to at least one token.
    """

    text: str
    label: str


@dataclass(frozen=True)
class Template:
    """How an example is written out as text.

    Args:
        input_template: the text around the input; one ``{}`` marks where the text goes.
        output_template: the text around the label; one ``{}`` marks where the label goes.
        intra_separator: between the input part and the output part (type 0).
        end_token: after the output part (type 0). None means the tokenizer's eos token; ``""``
            means no end token.
        example_separator: after each example of the context (type 0), so also between the
            context and the sample or query that follows it. ``""`` (the default): none, the end
            token already separates examples.
        attach_space: move the whitespace that ends a template's text before ``{}`` to the start
            of the text or label that fills the slot (``"output:"`` + ``" positive"`` rather
            than ``"output: "`` + ``"positive"``), so byte-level BPE tokenizers produce their
            usual word tokens. Turn off for SentencePiece tokenizers that add their own prefix
            space.

    Raises:
        ValueError: if a template does not contain exactly one ``{}``, naming the template, a
            text field is not a string of valid Unicode, or ``attach_space`` is not a bool.
    """

    input_template: str = "input: {}"
    output_template: str = "output: {}"
    intra_separator: str = " "
    end_token: str | None = None  # None: tokenizer.eos_token, the usual end of a document
    example_separator: str = ""  # "": the end token alone separates examples
    attach_space: bool = True  # " positive" is one natural token; " " + "positive" is not

    def __post_init__(self) -> None:
        for name in ("input_template", "output_template", "intra_separator", "example_separator"):
            check_text(getattr(self, name), f"Template.{name}")
        if self.end_token is not None and not isinstance(self.end_token, str):
            raise ValueError(f"Template.end_token must be a string or None, got {self.end_token!r}")
        if self.end_token is not None:
            check_text(self.end_token, "Template.end_token")
        check_bool(self.attach_space, "Template.attach_space")
        for name in ("input_template", "output_template"):
            value = getattr(self, name)
            if value.count(SLOT) != 1:
                raise ValueError(
                    f"Template.{name} must contain exactly one {SLOT!r}, got {value!r} "
                    f"({value.count(SLOT)} found)"
                )


@dataclass(frozen=True)
class RenderedExample:
    """Token ids and the type code of each: codes 0..4 for one example, 0..4K for a context.

    Args:
        input_ids: token ids, length S.
        type_codes: one type code per token, length S.

    Raises:
        ValueError: if the two lists differ in length.
    """

    input_ids: list[int]
    type_codes: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.type_codes):
            raise ValueError(
                f"input_ids and type_codes must have the same length, got "
                f"{len(self.input_ids)} and {len(self.type_codes)}"
            )

    def __len__(self) -> int:
        return len(self.input_ids)


def render_example(
    tokenizer: PreTrainedTokenizerBase, template: Template, text: str, label: str
) -> RenderedExample:
    """Renders a labelled example into token ids and type codes 0..4.

    Args:
        tokenizer: a Hugging Face tokenizer.
        template: how the example is written out.
        text: the input text; may be empty.
        label: the label; must tokenize to at least one token.

    Returns:
        A `RenderedExample` of length S: the query (`render_query`), then the label tokens (code 4),
        the output template's suffix (code 3) and the end token (code 0).

    Raises:
        ValueError: if the label tokenizes to no tokens, or the template needs an eos token that
            the tokenizer lacks.
    """
    template = as_template(template)
    query = render_query(tokenizer, template, text)
    _, output_suffix = template.output_template.split(SLOT)
    pieces = [
        (label_token_ids(tokenizer, template, label), TokenRole.LABEL),
        (_encode(tokenizer, output_suffix), TokenRole.OUTPUT_TEMPLATE),
        (_end_token_ids(tokenizer, template), TokenRole.SEPARATOR),
    ]
    rest = _join(pieces)
    return RenderedExample(query.input_ids + rest.input_ids, query.type_codes + rest.type_codes)


def render_query(
    tokenizer: PreTrainedTokenizerBase, template: Template, text: str
) -> RenderedExample:
    """Renders the prompt for inference: everything `render_example` puts before the label.

    Args:
        tokenizer: a Hugging Face tokenizer.
        template: how the example is written out.
        text: the input text; may be empty.

    Returns:
        A `RenderedExample` of length S (codes 0..3): input prefix (1), text (2), input suffix (1),
        intra separator (0), output prefix (3). It is a prefix of ``render_example`` for any label.
    """
    check_text(text, "text")
    template = as_template(template)
    input_prefix, input_suffix = template.input_template.split(SLOT)
    if text:
        input_prefix, text = _attach_space(template, input_prefix, text)
    output_prefix = _slot_prefix(template)
    return _join(
        [
            (_encode(tokenizer, input_prefix), TokenRole.INPUT_TEMPLATE),
            (_encode(tokenizer, text), TokenRole.INPUT),
            (_encode(tokenizer, input_suffix), TokenRole.INPUT_TEMPLATE),
            (_encode(tokenizer, template.intra_separator), TokenRole.SEPARATOR),
            (_encode(tokenizer, output_prefix), TokenRole.OUTPUT_TEMPLATE),
        ]
    )


def label_token_ids(
    tokenizer: PreTrainedTokenizerBase, template: Template, label: str
) -> list[int]:
    """The label's tokens exactly as `render_example` writes them (what a classifier scores).

    Args:
        tokenizer: a Hugging Face tokenizer.
        template: how examples are written out (with ``attach_space``, the label carries the
            output template's trailing whitespace).
        label: the label text.

    Returns:
        The label's token ids, at least one.

    Raises:
        ValueError: if the label tokenizes to no tokens, naming the label.
    """
    check_text(label, "label")
    template = as_template(template)
    output_prefix, _ = template.output_template.split(SLOT)
    _, label_text = _attach_space(template, output_prefix, label)
    ids = _encode(tokenizer, label_text)
    if not ids:
        raise ValueError(f"label {label!r} tokenizes to no tokens; a label needs at least one")
    return ids


def check_distinct_labels(labels: Sequence[str], label_ids: Sequence[Sequence[int]]) -> None:
    """Refuses two labels that render to the same tokens (words a word-level tokenizer maps to
    the same unknown token, spaces it drops): every score would tie between them, and the first
    would always win, whatever the model says.

    Args:
        labels: the labels.
        label_ids: each label's rendered tokens (`label_token_ids`, or everything
            `render_example` writes after the query).

    Raises:
        ValueError: naming both labels and their tokens.
    """
    first: dict[tuple[int, ...], int] = {}
    for j, ids in enumerate(label_ids):
        i = first.setdefault(tuple(ids), j)
        if i != j:
            raise ValueError(
                f"labels {i} ({labels[i]!r}) and {j} ({labels[j]!r}) render to the same tokens "
                f"{list(ids)}, so no score can tell them apart; use labels that the tokenizer "
                "writes differently"
            )


def shift_type_codes(type_codes: Sequence[int], offset: int) -> list[int]:
    """Adds ``offset`` to the non-zero codes, leaving separators (code 0) at 0.

    Example k of a context is shifted by ``4k``; a training sample by the context's highest code.

    Args:
        type_codes: codes, length S.
        offset: the amount to add, >= 0.

    Returns:
        The shifted codes, length S.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return [code + offset if code != TokenRole.SEPARATOR else code for code in type_codes]


def render_context(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example | tuple[str, str]], template: Template | None = None
) -> RenderedExample:
    """Renders K examples one after another, example k's non-zero codes shifted by ``4k``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        examples: K >= 1 labelled examples, as `Example` or ``(text, label)`` pairs.
        template: how each example is written out; the default `Template` if None.

    Returns:
        A `RenderedExample` of length N with codes 0..4K. The template's ``example_separator``
        (code 0), if any, follows every example, the last one included.

    Raises:
        ValueError: if there are no examples, or an example cannot be rendered.
    """
    template = as_template(template)
    examples = as_examples(examples)
    if not examples:
        raise ValueError("examples is empty: a context needs at least one example")
    separator = _encode(tokenizer, template.example_separator)
    input_ids: list[int] = []
    type_codes: list[int] = []
    for k, example in enumerate(examples):
        rendered = render_example(tokenizer, template, example.text, example.label)
        input_ids += rendered.input_ids + separator
        type_codes += shift_type_codes(rendered.type_codes, CODES_PER_EXAMPLE * k)
        type_codes += [int(TokenRole.SEPARATOR)] * len(separator)
    return RenderedExample(input_ids, type_codes)


def build_context(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example | tuple[str, str]],
    template: Template | None = None,
    **config_kwargs: Any,
) -> CPTConfig:
    """Builds the `CPTConfig` of a context made of K labelled examples.

    Args:
        tokenizer, examples, template: rendered by `render_context`; the tokenizer's
            ``name_or_path`` is recorded in the config (unless ``tokenizer_name_or_path`` is
            given; an empty name is stored as None).
        **config_kwargs: further `CPTConfig` fields (epsilons, loss type, ...).

    Returns:
        A config with ``cpt_token_ids``, ``cpt_mask`` (all ones) and ``cpt_tokens_type_mask``
        (codes 0..4K) of length N = ``num_virtual_tokens``, as in `render_context`.

    Raises:
        ValueError: if there are no examples, an example cannot be rendered, ``config_kwargs``
            sets a context field or one that `CPTConfig` does not have, or a config field is bad.
    """
    known = {f.name for f in fields(CPTConfig) if f.init}
    unknown = sorted(set(config_kwargs) - known)
    if unknown:
        options = sorted(known - set(_CONTEXT_FIELDS))
        raise ValueError(f"unknown CPTConfig option {unknown[0]!r}; the options are {options}")
    clashing = [name for name in _CONTEXT_FIELDS if name in config_kwargs]
    if clashing:
        raise ValueError(
            f"build_context makes {clashing} itself; do not pass them in config_kwargs"
        )
    context = render_context(tokenizer, examples, template)
    config_kwargs.setdefault(
        "tokenizer_name_or_path", getattr(tokenizer, "name_or_path", None) or None
    )
    return CPTConfig(
        cpt_token_ids=context.input_ids,
        cpt_mask=[1] * len(context),  # every context token is attended to
        cpt_tokens_type_mask=context.type_codes,
        **config_kwargs,
    )


TEXT_KEY = "text"
LABEL_KEY = "label"
"""The keys of an example's text and label: in a mapping (a ``datasets`` row), a JSON Lines
record and a CSV header (`cpt.labelled_data`)."""

ExampleLike = Example | tuple[Any, Any] | Mapping[str, Any]
"""What an example may be given as: an `Example`, a ``(text, label)`` pair, or a mapping with
``"text"`` and ``"label"`` keys (a row of a ``datasets.Dataset``); the label is a string, or an
integer index into a list of label names (a ``datasets.ClassLabel``)."""


def as_example(
    item: ExampleLike, index: int | None = None, label_names: Sequence[str] | None = None
) -> Example:
    """Returns ``item`` as an `Example`.

    Args:
        item: an `Example`, a ``(text, label)`` pair, or a mapping with ``"text"`` and
            ``"label"`` keys (other keys are ignored).
        index: the item's position, named in errors.
        label_names: the names that integer labels index (``ClassLabel.names``); None when
            labels are strings.

    Raises:
        ValueError: if ``item`` has none of these shapes, its text is not a string of valid
            Unicode (`cpt._fields.text_problem`), its label is neither such a string nor an
            integer within ``label_names``, or it has an integer label
            and no ``label_names``; the message names the index when given.
    """
    where = "" if index is None else f" at index {index}"
    if isinstance(item, Example):
        text, label = item.text, item.label
    elif isinstance(item, Mapping):
        missing = [key for key in (TEXT_KEY, LABEL_KEY) if key not in item]
        if missing:
            raise ValueError(
                f"example{where} needs the keys 'text' and 'label', lacks {missing}: {_short(item)}"
            )
        text, label = item[TEXT_KEY], item[LABEL_KEY]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        text, label = item
    else:
        raise ValueError(
            f"example{where} must be an Example, a (text, label) pair or a mapping with 'text' "
            f"and 'label' keys, got {_short(item)}"
        )
    if _is_index(label):
        if label_names is None:
            raise ValueError(
                f"example{where} has the integer label {label!r}: pass the label names "
                "(labels=[...], e.g. a ClassLabel's names) that it indexes"
            )
        if not 0 <= int(label) < len(label_names):
            raise ValueError(
                f"example{where} has label index {int(label)}, outside the {len(label_names)} "
                f"label names {list(label_names)}"
            )
        label = label_names[int(label)]
    if not (isinstance(text, str) and isinstance(label, str)):
        raise ValueError(f"example{where} must have string text and label, got {_short(item)}")
    check_text(text, f"example{where}: the text")
    check_text(label, f"example{where}: the label")
    return Example(text=text, label=label)


def as_examples(
    items: Iterable[ExampleLike], what: str = "examples", label_names: Sequence[str] | None = None
) -> list[Example]:
    """``items`` as a list of `Example` (`as_example`, each with its index).

    Raises:
        ValueError: if ``items`` is a string or not iterable (naming ``what``), or an item is
            not an example.
    """
    return [as_example(item, i, label_names) for i, item in enumerate(as_list(items, what, "examples"))]


def as_texts(texts: Any) -> list[Any]:
    """The texts of a sequence of texts, `Example` objects or mappings with a ``"text"`` key (rows of
    a ``datasets.Dataset``), as a list; each text is left for the caller to check.

    Raises:
        ValueError: if ``texts`` is a string or not a sequence (`cpt._fields.as_list`).
    """
    return [_text_of(item) for item in as_list(texts, "texts", "strings")]


def _text_of(item: Any) -> Any:
    if isinstance(item, Example):
        return item.text
    if isinstance(item, Mapping) and TEXT_KEY in item:
        return item[TEXT_KEY]
    return item


def _is_index(value: Any) -> bool:
    """True for integers (Python's or NumPy's), not for booleans."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, str)


def _short(item: Any) -> str:
    text = repr(item)
    return text if len(text) <= _REPR_MAX_CHARS else text[: _REPR_MAX_CHARS - 3] + "..."


class CPTDataset(Dataset[dict[str, list[int]]]):
    """Training samples: each example rendered alone, with codes 0..4 (not shifted).

    All examples are rendered when the dataset is made, so a bad one fails early.

    Args:
        tokenizer: a Hugging Face tokenizer.
        examples: labelled examples, as `Example` or ``(text, label)`` pairs.
        template: how each example is written out (use the context's); the default if None.
        max_length: the most tokens a sample may have; None for no limit.

    Raises:
        ValueError: if an example cannot be rendered or has more than ``max_length`` tokens,
            naming its index, or ``max_length`` is below 1.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[Example | tuple[str, str]],
        template: Template | None = None,
        max_length: int | None = None,
    ) -> None:
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be an integer >= 1 or None, got {max_length!r}")
        self.template = as_template(template)
        self.max_length = max_length
        self.samples: list[RenderedExample] = []
        for i, example in enumerate(as_examples(examples)):
            try:
                rendered = render_example(tokenizer, self.template, example.text, example.label)
            except ValueError as error:
                raise ValueError(f"example {i}: {error}") from error
            if max_length is not None and len(rendered) > max_length:
                raise ValueError(
                    f"example {i} has {len(rendered)} tokens, more than max_length={max_length}"
                )
            self.samples.append(rendered)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        """Returns ``dict(input_ids=list[int], input_type_mask=list[int])`` (codes 0..4), length S."""
        sample = self.samples[index]
        return {"input_ids": list(sample.input_ids), "input_type_mask": list(sample.type_codes)}


def padding_id(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> int:
    """The id to write on padding positions. Every pass masks them out, but the embedding lookup
    still reads them, so any id the model can embed serves: the tokenizer's pad token, else its
    eos token, when the model's ``vocab_size`` embeddings hold it, else 0. (A tokenizer may have
    no pad token, or one added without the model's embeddings growing.)"""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if is_int(candidate) and 0 <= candidate < vocab_size:
            return candidate
    return 0


def right_pad(
    rows: Sequence[Sequence[int]] | torch.Tensor, value: int, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids (or codes, labels) padded with ``value`` on the right to one length S: the
    longest row's, rounded up to a multiple of ``multiple``. Every batch `cpt` makes is padded
    here: the collator's, `cpt.infer`'s and `cpt.graphs`' (which pads to shapes it has captured).

    Args:
        rows: B >= 1 rows: lists of any lengths (the result is long, on the CPU), or a (B, S0)
            tensor (the result keeps its dtype and device).
        value: what padding positions hold.
        multiple: S is a multiple of it, >= 1.

    Returns:
        ``(padded, mask)``, each (B, S): the rows followed by ``value``, and the long mask of
        real positions (1) and padding (0).
    """
    if isinstance(rows, torch.Tensor):  # (B, S0): one length, kept where it is
        lengths, like = [rows.shape[1]] * rows.shape[0], rows
    else:
        lengths, like = [len(row) for row in rows], torch.empty(0, dtype=torch.long)
    length = max(lengths) + -max(lengths) % multiple
    padded = like.new_full((len(lengths), length), value)  # (B, S)
    mask = torch.zeros((len(lengths), length), dtype=torch.long, device=padded.device)  # (B, S)
    if isinstance(rows, torch.Tensor):
        padded[:, : rows.shape[1]] = rows
        mask[:, : rows.shape[1]] = 1
    else:
        for b, row in enumerate(rows):
            padded[b, : lengths[b]] = torch.as_tensor(row, dtype=torch.long)
            mask[b, : lengths[b]] = 1
    return padded, mask


def epoch_steps(num_samples: int, batch_size: int, accumulation: int = 1) -> tuple[int, int]:
    """The length of an epoch of ``num_samples`` samples in batches of ``batch_size``, with
    ``accumulation`` batches an optimizer step: ``(batches, steps)``, the last of each possibly
    short. `cpt.train`, `cpt.workflow` and `cpt.checkpoint` all count an epoch here."""
    batches = -(-num_samples // batch_size)
    return batches, -(-batches // accumulation)


class CPTCollator:
    """Right-pads `CPTDataset` items into a batch.

    Args:
        pad_token_id: the id written on padding positions (masked out everywhere).

    Raises:
        ValueError: if ``pad_token_id`` is None or negative.
    """

    def __init__(self, pad_token_id: int) -> None:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise ValueError(
                f"pad_token_id must be an integer, got {pad_token_id!r} (set tokenizer.pad_token?)"
            )
        if not 0 <= pad_token_id <= torch.iinfo(torch.long).max:
            raise ValueError(f"pad_token_id must be >= 0 and fit int64, got {show(pad_token_id)}")
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        """Collates B items of lengths S_b into tensors of shape (B, S), S = max S_b.

        Args:
            items: dicts with ``input_ids`` and ``input_type_mask`` (codes) of equal length >= 1.

        Returns:
            ``input_ids`` (B, S) long, padded with ``pad_token_id``; ``attention_mask`` (B, S) long,
            1 on tokens and 0 on padding; ``labels`` (B, S) long, the input ids with -100 on
            padding; ``input_type_mask`` (B, S) long, codes 0..4 with 0 on padding.

        Raises:
            ValueError: if there are no items, or an item is not a mapping of two integer lists,
                is empty or has ids and codes of different lengths, naming its index.
        """
        items = [_sample(item, b) for b, item in enumerate(as_list(items, "items", "samples"))]
        if len(items) == 0:
            raise ValueError("cannot collate an empty list of items")
        for b, item in enumerate(items):
            n_ids, n_codes = len(item["input_ids"]), len(item["input_type_mask"])
            if n_ids != n_codes:
                raise ValueError(
                    f"item {b} has {n_ids} input_ids but {n_codes} input_type_mask codes; they must match"
                )
            if n_ids == 0:
                raise ValueError(f"item {b} is empty")
        input_ids, attention_mask = right_pad([item["input_ids"] for item in items], self.pad_token_id)  # (B, S)
        type_mask, _ = right_pad([item["input_type_mask"] for item in items], int(TokenRole.SEPARATOR))  # (B, S)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # (B, S)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "input_type_mask": type_mask,
        }


def _sample(item: Any, index: int) -> dict[str, list[int]]:
    """A collator's item as ``{"input_ids": [...], "input_type_mask": [...]}`` of checked ints."""
    if not isinstance(item, Mapping):
        raise ValueError(f"item {index} must be a mapping with input_ids and input_type_mask, got {_short(item)}")
    missing = [key for key in ("input_ids", "input_type_mask") if key not in item]
    if missing:
        raise ValueError(f"item {index} lacks {missing}")
    return {key: int_list(f"item {index}: {key}", item[key]) for key in ("input_ids", "input_type_mask")}


def task_template(task: Mapping[str, Any] | None) -> Template:
    """The template a task records (`fit` and saved adapters write it to ``CPTModel.task``), or
    the default `Template` where it records none (no task, no ``"template"`` key, or null: what
    `cpt.adapter` accepts).

    Raises:
        ValueError: if ``task`` is not a mapping, or its template not one of `Template`'s fields.
    """
    if task is not None and not isinstance(task, Mapping):
        raise ValueError(f"the model's task must be a dict or None, got {type(task).__name__}")
    if task is None or task.get("template") is None:
        return Template()
    try:
        return Template(**task["template"])
    except TypeError:
        raise ValueError(f"the model's task template must be a dict of Template fields, got {_short(task['template'])}") from None


def as_template(template: Template | None) -> Template:
    """``template``, or the default `Template` for None (what every function that takes a
    template does with it).

    Raises:
        ValueError: if ``template`` is neither a `Template` nor None.
    """
    if template is None:
        return Template()
    if not isinstance(template, Template):
        raise ValueError(f"template must be a cpt.Template or None, got {type(template).__name__}")
    return template


def _attach_space(template: Template, prefix: str, text: str) -> tuple[str, str]:
    """Moves the whitespace that ends ``prefix`` to the start of ``text`` (if asked and useful)."""
    if not template.attach_space or not text:
        return prefix, text
    kept = prefix.rstrip()
    return kept, prefix[len(kept):] + text


def _slot_prefix(template: Template) -> str:
    """The output template's text before ``{}`` as the query ends it (no trailing space when the
    label carries it)."""
    output_prefix, _ = template.output_template.split(SLOT)
    return output_prefix.rstrip() if template.attach_space else output_prefix


def _encode(tokenizer: PreTrainedTokenizerBase, piece: str) -> list[int]:
    """Token ids of one piece, without special tokens; ``[]`` for an empty piece."""
    from transformers import PreTrainedTokenizerBase  # loaded with cpt.model already

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ValueError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    if not piece:
        return []
    return list(tokenizer.encode(piece, add_special_tokens=False))


def _end_token_ids(tokenizer: PreTrainedTokenizerBase, template: Template) -> list[int]:
    """The end token's ids: the tokenizer's eos token when ``template.end_token`` is None."""
    end_token = template.end_token
    if end_token is None:
        end_token = getattr(tokenizer, "eos_token", None)
        if end_token is None:
            raise ValueError(
                "Template.end_token is None but the tokenizer has no eos_token; "
                'set end_token ("" for none)'
            )
    if end_token in getattr(tokenizer, "all_special_tokens", ()):
        return [int(tokenizer.convert_tokens_to_ids(end_token))]  # one id, however it would split
    return _encode(tokenizer, end_token)


def _join(pieces: Sequence[tuple[list[int], TokenRole]]) -> RenderedExample:
    """Concatenates tokenized pieces, giving each token its piece's role."""
    input_ids: list[int] = []
    type_codes: list[int] = []
    for ids, role in pieces:
        input_ids += ids
        type_codes += [int(role)] * len(ids)
    return RenderedExample(input_ids, type_codes)
