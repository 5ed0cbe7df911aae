"""Configuration of a CPT context, with PEFT's field names and defaults.

A context is N token ids, an attention mask over them and a type code per token. The type code
of example k (0-based) of the context is its role (1..4) plus 4k, or 0 for separators
(`check_type_codes`); `check_trainable` says whether a context can be trained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import IntEnum
from typing import Any, Literal, get_args

import torch

from cpt import _io
from cpt._fields import int_list, is_finite, show

CODES_PER_EXAMPLE = 4
"""Each example of the context uses four type codes: 4k+1 .. 4k+4."""

EPSILON_REFERENCE_DIM = 2048
"""Epsilons are given for a hidden size of 2048 and scaled by sqrt(d / 2048) (see docs/method.md)."""

FROZEN_EPSILON = 1e-10
"""Ball radius of rows that never move (labels and separators), as in PEFT."""

MAX_EPSILON = 1e6
"""Largest accepted ``opt_projection_epsilon`` / ``opt_projection_format_epsilon``: far beyond any
embedding's norm (so no real bound), and its scaled radius stays finite in float32."""

IGNORE_INDEX = -100
"""Label value that marks a position as not a target (PyTorch's and Hugging Face's default)."""

LOSS_TYPES = ("none", "decay")
TASK_TYPE = "CAUSAL_LM"
PEFT_TYPE = "CPT"

CPT_CONFIG_NAME = "cpt_config.json"
CPT_WEIGHTS_NAME = "cpt_adapter.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (CPT_CONFIG_NAME, CPT_WEIGHTS_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)
"""The files of an adapter in either layout (`cpt.adapter`): a save writes its layout's two and
drops the others; a download fetches these and nothing else (`cpt.hub`)."""

AdapterFormat = Literal["cpt", "peft"]
ADAPTER_FORMATS: tuple[AdapterFormat, ...] = get_args(AdapterFormat)
"""An adapter's layouts on disk (`cpt.adapter`): ``"cpt"`` (base and delta apart, with the task)
or ``"peft"`` (PEFT's: the trained embeddings only)."""


def check_adapter_format(value: object, name: str = "format") -> AdapterFormat:
    """``value``, checked to be one of `ADAPTER_FORMATS`.

    Raises:
        ValueError: naming ``name`` and the value.
    """
    if not isinstance(value, str) or value not in ADAPTER_FORMATS:
        raise ValueError(f"{name} must be {' or '.join(map(repr, ADAPTER_FORMATS))}, got {value!r}")
    return value  # type: ignore[return-value]


class TokenRole(IntEnum):
    """What a token of a rendered example is; the type code is ``role + 4 * example``."""

    SEPARATOR = 0  # separators, end of sequence, padding: never updated, never a target
    INPUT_TEMPLATE = 1  # e.g. "input: ": updated within the format epsilon
    INPUT = 2  # the example's text: updated within the input epsilon
    OUTPUT_TEMPLATE = 3  # e.g. "output: ": updated within the format epsilon
    LABEL = 4  # the label's tokens: never updated, the loss targets


def token_roles(type_codes: torch.Tensor) -> torch.Tensor:
    """Maps type codes to `TokenRole` values.

    Args:
        type_codes: integer tensor of any shape, codes >= 0.

    Returns:
        Tensor of the same shape: 0 for code 0, 4 for the other multiples of 4, else ``code % 4``.
    """
    role = torch.remainder(type_codes, CODES_PER_EXAMPLE)
    is_label = (type_codes > 0) & (role == 0)
    return torch.where(is_label, torch.full_like(role, int(TokenRole.LABEL)), role)


def is_label(type_codes: torch.Tensor) -> torch.Tensor:
    """Boolean mask of label tokens (the loss targets): code > 0 and a multiple of 4."""
    return (type_codes > 0) & (torch.remainder(type_codes, CODES_PER_EXAMPLE) == 0)


def is_trainable(type_codes: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the tokens whose embedding may move: roles 1, 2 and 3."""
    return torch.remainder(type_codes, CODES_PER_EXAMPLE) != 0


@dataclass
class CPTConfig:
    """Configuration of Context-aware Prompt Tuning.

    Field names and defaults follow PEFT's ``CPTConfig`` so that adapter configs move both ways.

    Args:
        cpt_token_ids: token ids of the context, length N. PEFT fills a missing list with ``[0]``.
        cpt_mask: attention mask of the context (0 or 1 per token), length N; all ones by default.
        cpt_tokens_type_mask: type code per context token (see docs/method.md), length N; all
            ones by default.
        opt_weighted_loss_type: ``"none"`` (every label weighs 1) or ``"decay"`` (older examples
            weigh ``opt_loss_decay_factor ** age``).
        opt_loss_decay_factor: gamma of the decay, in (0, 1].
        opt_projection_epsilon: L2 radius of the input rows' offsets, for hidden size 2048.
        opt_projection_format_epsilon: L2 radius of the template rows' offsets, for hidden size 2048.
        tokenizer_name_or_path: the tokenizer the context was made with (informational).
        task_type: only ``"CAUSAL_LM"``.

    Raises:
        ValueError: naming the bad field and value.
    """

    cpt_token_ids: list[int] | None = None
    cpt_mask: list[int] | None = None
    cpt_tokens_type_mask: list[int] | None = None
    opt_weighted_loss_type: str = "none"
    opt_loss_decay_factor: float = 1.0  # 1.0: no decay, even under "decay"
    opt_projection_epsilon: float = 0.1  # PEFT's default input-row radius
    opt_projection_format_epsilon: float = 0.1  # PEFT's default template-row radius
    tokenizer_name_or_path: str | None = None
    task_type: str = TASK_TYPE
    num_virtual_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.task_type, str) or self.task_type != TASK_TYPE:
            raise ValueError(f"task_type must be {TASK_TYPE!r}, got {self.task_type!r}")
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]  # what PEFT does with a missing context
        self.cpt_token_ids = int_list("cpt_token_ids", self.cpt_token_ids)
        if not self.cpt_token_ids:
            raise ValueError("cpt_token_ids is empty: the context needs at least one token")
        n = len(self.cpt_token_ids)
        if self.cpt_mask is None:
            self.cpt_mask = [1] * n
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1] * n
        self.cpt_mask = int_list("cpt_mask", self.cpt_mask)
        self.cpt_tokens_type_mask = int_list("cpt_tokens_type_mask", self.cpt_tokens_type_mask)
        if not len(self.cpt_mask) == len(self.cpt_tokens_type_mask) == n:
            raise ValueError(
                "cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length, got "
                f"{n}, {len(self.cpt_mask)} and {len(self.cpt_tokens_type_mask)}"
            )
        if min(self.cpt_token_ids) < 0:
            raise ValueError(f"cpt_token_ids has a negative id: {min(self.cpt_token_ids)}")
        if any(m not in (0, 1) for m in self.cpt_mask):
            bad = next(m for m in self.cpt_mask if m not in (0, 1))
            raise ValueError(f"cpt_mask must hold only 0 and 1, found {bad}")
        if 1 not in self.cpt_mask:
            raise ValueError("cpt_mask is all zeros: no context token would be attended to")
        check_type_codes(self.cpt_tokens_type_mask)
        if not isinstance(self.opt_weighted_loss_type, str) or self.opt_weighted_loss_type not in LOSS_TYPES:
            raise ValueError(
                f"opt_weighted_loss_type must be one of {LOSS_TYPES}, got {self.opt_weighted_loss_type!r}"
            )
        decay = self.opt_loss_decay_factor
        if not (is_finite(decay) and 0.0 < decay <= 1.0):
            raise ValueError(f"opt_loss_decay_factor must be in (0, 1], got {show(decay)}")
        for name in ("opt_projection_epsilon", "opt_projection_format_epsilon"):
            value = getattr(self, name)
            if not (is_finite(value) and 0.0 <= value <= MAX_EPSILON):
                raise ValueError(f"{name} must be a number in [0, {MAX_EPSILON:g}], got {show(value)}")
        if self.tokenizer_name_or_path is not None and not isinstance(self.tokenizer_name_or_path, str):
            raise ValueError(
                f"tokenizer_name_or_path must be a string or None, got {self.tokenizer_name_or_path!r}"
            )
        self.opt_loss_decay_factor = float(decay)
        self.opt_projection_epsilon = float(self.opt_projection_epsilon)
        self.opt_projection_format_epsilon = float(self.opt_projection_format_epsilon)
        self.num_virtual_tokens = n

    @property
    def num_examples(self) -> int:
        """Number of examples in the context (the highest example index among its codes, + 1)."""
        return (max(self.cpt_tokens_type_mask) + CODES_PER_EXAMPLE - 1) // CODES_PER_EXAMPLE

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON types, ``num_virtual_tokens`` included."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CPTConfig:
        """Builds a config from a dict, ignoring keys that are not fields (e.g. PEFT-only keys).

        Raises:
            ValueError: if ``data`` is not a dict, ``peft_type`` is present and is not ``"CPT"``,
                or a field is bad.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a CPTConfig is read from a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type")
        if peft_type is not None and str(peft_type) != PEFT_TYPE:
            raise ValueError(f"adapter config has peft_type {peft_type!r}, expected {PEFT_TYPE!r}")
        names = {f.name for f in fields(cls) if f.init}
        config = cls(**{k: v for k, v in data.items() if k in names})
        declared = data.get("num_virtual_tokens")
        if declared is not None and (
            isinstance(declared, bool) or not isinstance(declared, int) or declared != config.num_virtual_tokens
        ):
            raise ValueError(
                f"num_virtual_tokens is {declared} but cpt_token_ids has {config.num_virtual_tokens} ids"
            )
        return config

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> CPTConfig:
        """Builds a config from JSON text (`from_dict`).

        Raises:
            ValueError: if the text is not a JSON object, or a field is bad.
        """
        try:
            data = _io.strict_json(text)
        except (TypeError, ValueError, RecursionError) as error:
            raise ValueError(f"not a CPTConfig JSON text: {error}") from None
        return cls.from_dict(data)

    def to_peft_dict(self, token_dim: int, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` content that PEFT's ``CPTConfig`` accepts.

        Args:
            token_dim: hidden size of the model the adapter belongs to.
            base_model_name_or_path: recorded for PEFT's loaders; may be None.
        """
        data = self.to_dict()
        data.update(
            peft_type=PEFT_TYPE,
            task_type=TASK_TYPE,
            token_dim=token_dim,
            num_transformer_submodules=1,
            num_attention_heads=None,
            num_layers=None,
            inference_mode=True,
            base_model_name_or_path=base_model_name_or_path,
            revision=None,
            auto_mapping=None,
        )
        return data


def type_code(example: int, role: TokenRole) -> int:
    """The type code of ``role`` in example ``example`` (0-based) of a context."""
    return CODES_PER_EXAMPLE * example + role


def _codes(example: int, last: TokenRole = TokenRole.LABEL) -> str:
    """``"first..last"``: example ``example``'s codes, for messages."""
    return f"{type_code(example, TokenRole.INPUT_TEMPLATE)}..{type_code(example, last)}"


def check_type_codes(codes: list[int]) -> None:
    """Checks that a context's type codes follow the four-codes-per-example scheme.

    Example k (0-based) uses codes ``4k+1 .. 4k+4`` (roles 1..4), separators 0. The examples
    present must be 0, 1, ... without a gap, each one's tokens must come before the next one's,
    and a label (role 4) must come after its example's input (role 2). Whether the context can be
    trained is a separate question (`check_trainable`).

    Raises:
        ValueError: naming the position and code that break the scheme.
    """
    for position, code in enumerate(codes):
        if code < 0:
            raise ValueError(f"cpt_tokens_type_mask has a type code below 0: {code} at position {position}")
    examples = sorted({(c - 1) // CODES_PER_EXAMPLE for c in codes if c > 0})
    for expected, example in enumerate(examples):
        if example != expected:
            raise ValueError(
                f"cpt_tokens_type_mask skips example {expected}: it has codes of example {example} "
                f"({_codes(example)}) but none of {_codes(expected)}"
            )
    current = -1
    last_input: dict[int, int] = {}
    first_label: dict[int, int] = {}
    for position, code in enumerate(codes):
        if code == 0:
            continue
        example, role = (code - 1) // CODES_PER_EXAMPLE, (code - 1) % CODES_PER_EXAMPLE + 1
        if example < current:
            raise ValueError(
                f"cpt_tokens_type_mask: code {code} at position {position} belongs to example {example}, "
                f"but example {current} has already begun: each example's codes must be consecutive"
            )
        current = example
        if role == TokenRole.INPUT:
            last_input[example] = position
        elif role == TokenRole.LABEL:
            first_label.setdefault(example, position)
    for example, position in first_label.items():
        if last_input.get(example, -1) > position:
            raise ValueError(
                f"cpt_tokens_type_mask: the label of example {example} (code {type_code(example, TokenRole.LABEL)}) "
                f"at position {position} comes before its input (code {type_code(example, TokenRole.INPUT)}) at "
                f"position {last_input[example]}"
            )


def check_trainable(config: CPTConfig) -> None:
    """Checks that training ``config``'s context can work: a row to train, and label targets.

    The samples' type codes are shifted by the context's highest code (as PEFT does), so that a
    sample counts as the example after the context's last one. That shift keeps a sample's
    labels on multiples of 4 only if the highest code is one; otherwise the loss would target
    template tokens.

    Raises:
        ValueError: if no row is trainable (codes 4k+1..4k+3), or the highest code is not a
            multiple of 4 (the shift is explained).
    """
    codes = config.cpt_tokens_type_mask
    if not any(c > 0 and c % CODES_PER_EXAMPLE for c in codes):
        raise ValueError(
            "the context has no trainable row: no type code is a template or input code (4k+1..4k+3), "
            "so training would change nothing"
        )
    highest = max(codes)
    if highest % CODES_PER_EXAMPLE:
        raise ValueError(
            f"the context's highest type code is {highest}, not a multiple of 4 (its last example has no "
            f"label): each sample's codes are shifted by {highest} to follow the context, so a sample's "
            f"label (code {TokenRole.LABEL:d}) would become {TokenRole.LABEL + highest} and its template codes "
            f"{_codes(0, last=TokenRole.OUTPUT_TEMPLATE)} would become {TokenRole.INPUT_TEMPLATE + highest}.."
            f"{TokenRole.OUTPUT_TEMPLATE + highest}, some of them multiples of 4: the loss would target template "
            "tokens instead of the label. End the context with a labelled example (its codes 4k+1..4k+4, "
            "the label 4k+4), as build_context does"
        )
