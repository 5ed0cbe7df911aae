"""Tiny random causal LMs built from `transformers` config classes: nothing is downloaded."""

from __future__ import annotations

import torch
import transformers

VOCAB = 96
HIDDEN = 32

_COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# (config class, model class, kwargs): small, dropout-free, eager-equal attention
ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, sliding_window=256,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=HIDDEN, dropout=0.0, attention_dropout=0.0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, hidden_dropout=0.0, attention_dropout=0.0)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(
        hidden_size=HIDDEN, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, hidden_dropout=0.0,
        attention_dropout=0.0, new_decoder_architecture=False, multi_query=True, alibi=False)),
}


def make_model(
    arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, vocab_size: int = VOCAB
) -> torch.nn.Module:
    """A tiny random model of architecture ``arch`` in eval mode."""
    config_cls, model_cls, kwargs = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(**{**_COMMON, "vocab_size": vocab_size}, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    return model.to(dtype).eval()
