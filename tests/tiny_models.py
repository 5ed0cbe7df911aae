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


_LLAMA_LIKE = dict(
    hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512,
)
_GPT_LIKE = dict(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

# More families, for the parity tests: together with ARCHITECTURES, every decoder-only family of
# `transformers` that builds from a small config without extra parts (vision towers, ...).
MORE_ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA_LIKE, head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_LLAMA_LIKE, head_dim=8)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_LLAMA_LIKE, head_dim=8, sliding_window=256)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _LLAMA_LIKE),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _LLAMA_LIKE),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(
        _LLAMA_LIKE, residual_dropout=0.0, embedding_dropout=0.0, attention_dropout=0.0)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(_GPT_LIKE, rotary_dim=4)),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(_GPT_LIKE, rotary_dim=4)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", _GPT_LIKE),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(
        hidden_size=HIDDEN, num_layers=2, num_heads=4, max_position_embeddings=512, attention_types=[[["global"], 2]],
        resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", _LLAMA_LIKE),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _LLAMA_LIKE),
    "granite": ("GraniteConfig", "GraniteForCausalLM", _LLAMA_LIKE),
    "cohere": ("CohereConfig", "CohereForCausalLM", _LLAMA_LIKE),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(_LLAMA_LIKE, sliding_window=256)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_LLAMA_LIKE, num_local_experts=2, num_experts_per_tok=1)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        _LLAMA_LIKE, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", _LLAMA_LIKE),
    "helium": ("HeliumConfig", "HeliumForCausalLM", dict(_LLAMA_LIKE, head_dim=8)),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(_LLAMA_LIKE, head_dim=8)),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", _LLAMA_LIKE),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(_LLAMA_LIKE, head_dim=8)),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, hidden_dropout=0.0, attention_dropout=0.0)),
    "biogpt": ("BioGptConfig", "BioGptForCausalLM", dict(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", dict(
        d_model=HIDDEN, num_layers=2, attention_heads=4, ffn_dim=64, max_position_embeddings=512, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0)),
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=HIDDEN, n_layers=2, n_heads=4, max_seq_len=512)),
}

FAMILIES = {**ARCHITECTURES, **MORE_ARCHITECTURES}

ON_THE_INTERFACE_SINCE_5_17 = frozenset(FAMILIES) - {"bloom", "falcon", "gpt_neo", "xglm", "mpt", "gptj", "codegen"}
"""Families whose attention went through `transformers`' AttentionInterface in 5.17, the oldest
release pyproject.toml admits: one-copy attention reproduces them, so the capability probe must
admit them on every release from then on. The others keep their own attention code (ALiBi,
unscaled scores) in some releases and not in others (Falcon moved in 5.25, GPT-J and CodeGen
between 5.17 and 5.24): for those, the probe's answer on the installed release is the truth,
and the parity tests check whichever path it picks."""


def make_model(
    arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, vocab_size: int = VOCAB
) -> torch.nn.Module:
    """A tiny random model of architecture ``arch`` in eval mode."""
    config_cls, model_cls, kwargs = FAMILIES[arch]
    config = getattr(transformers, config_cls)(
        **{**_COMMON, "vocab_size": vocab_size}, **kwargs, attn_implementation="eager"
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    return model.to(dtype).eval()
