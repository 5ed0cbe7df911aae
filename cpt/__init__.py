"""Context-aware Prompt Tuning (Blau et al., arXiv 2410.17222) for Hugging Face causal LMs.

The training loop is `cpt.train.train` (not re-exported here: the name would hide the module).

The few-shot workflow in one call::

    from cpt import fit, classify

    model, _ = fit(base_model, tokenizer, [("a gripping film", "positive"), ...])
    classify(model, tokenizer, ["dull and long"], ["negative", "positive"]).predictions
"""

from cpt.adapter import adapter_format, load_adapter, save_adapter
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
from cpt.model import ContextCache, CPTModel, CPTOutput
from cpt.train import TrainConfig, TrainResult, load_checkpoint, save_checkpoint
from cpt.workflow import fit

__all__ = [
    "CODES_PER_EXAMPLE",
    "Classification",
    "ContextCache",
    "CPTCollator",
    "CPTConfig",
    "CPTDataset",
    "CPTModel",
    "CPTOutput",
    "CPTProjectionCallback",
    "CPTTrainer",
    "Example",
    "RenderedExample",
    "Template",
    "TokenRole",
    "TrainConfig",
    "TrainResult",
    "TrainerCollator",
    "adapter_format",
    "build_context",
    "classify",
    "fit",
    "generate",
    "label_token_ids",
    "load_adapter",
    "load_checkpoint",
    "render_example",
    "render_query",
    "save_adapter",
    "save_checkpoint",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The Trainer callback imports transformers' trainer utilities (and accelerate/peft with
    # them); it loads on first use so that ``import cpt`` stays light.
    if name in ("CPTProjectionCallback", "CPTTrainer", "TrainerCollator"):
        import cpt.callback

        return getattr(cpt.callback, name)
    raise AttributeError(f"module 'cpt' has no attribute {name!r}")
