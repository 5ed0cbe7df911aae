"""Context-aware Prompt Tuning (Blau et al., arXiv 2410.17222) for Hugging Face causal LMs."""

from cpt.adapter import adapter_format, load_adapter, save_adapter
from cpt.config import CODES_PER_EXAMPLE, CPTConfig, TokenRole
from cpt.model import ContextCache, CPTModel, CPTOutput

__all__ = [
    "CODES_PER_EXAMPLE",
    "ContextCache",
    "CPTConfig",
    "CPTModel",
    "CPTOutput",
    "TokenRole",
    "adapter_format",
    "load_adapter",
    "save_adapter",
]

__version__ = "0.1.0"
