"""Context-aware Prompt Tuning (Blau et al., arXiv 2410.17222) for Hugging Face causal LMs.

The training loop is `cpt.train.train` (not re-exported here: the name would hide the module).

The few-shot workflow in one call::

    from cpt import classify, fit, load_model_and_tokenizer

    base_model, tokenizer = load_model_and_tokenizer()
    model, _ = fit(base_model, tokenizer, [("a gripping film", "positive"), ...])
    classify(model, tokenizer, ["dull and long"], ["negative", "positive"]).predictions

``import cpt`` is light: each public name below is imported from its module on first use (the
model code loads ``transformers``' modelling utilities, the Trainer callback its trainer), so
``import cpt`` and ``cpt --help`` load neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"  # the one source: pyproject.toml reads it as text, `cpt --version` prints it

_EXPORTS: dict[str, str] = {
    "save_adapter": "cpt.adapter",
    "load_adapter": "cpt.model",
    "adapter_format": "cpt.adapter",
    "CPTProjectionCallback": "cpt.callback",
    "CPTTrainer": "cpt.callback",
    "TrainerCollator": "cpt.callback",
    "CODES_PER_EXAMPLE": "cpt.config",
    "CPTConfig": "cpt.config",
    "TokenRole": "cpt.config",
    "CPTCollator": "cpt.data",
    "CPTDataset": "cpt.data",
    "Example": "cpt.data",
    "RenderedExample": "cpt.data",
    "Template": "cpt.data",
    "build_context": "cpt.data",
    "label_token_ids": "cpt.data",
    "render_example": "cpt.data",
    "render_query": "cpt.data",
    "Classification": "cpt.infer",
    "classify": "cpt.infer",
    "generate": "cpt.infer",
    "load_model_and_tokenizer": "cpt.pretrained",
    "ContextCache": "cpt.model",
    "CPTModel": "cpt.model",
    "CPTOutput": "cpt.model",
    "TrainConfig": "cpt.train",
    "TrainResult": "cpt.train",
    "load_checkpoint": "cpt.train",
    "save_checkpoint": "cpt.train",
    "fit": "cpt.workflow",
}
"""Each public name and the module that defines it."""

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time `__getattr__` does this lazily
    from cpt.adapter import adapter_format, save_adapter
    from cpt.callback import CPTProjectionCallback, CPTTrainer, TrainerCollator
    from cpt.config import CODES_PER_EXAMPLE, CPTConfig, TokenRole
    from cpt.data import (
        CPTCollator,
        CPTDataset,
        Example,
        RenderedExample,
        Template,
        build_context,
        label_token_ids,
        render_example,
        render_query,
    )
    from cpt.infer import Classification, classify, generate
    from cpt.pretrained import load_model_and_tokenizer
    from cpt.model import ContextCache, CPTModel, CPTOutput, load_adapter
    from cpt.train import TrainConfig, TrainResult, load_checkpoint, save_checkpoint
    from cpt.workflow import fit


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
