"""A tiny llama model and its byte-level BPE tokenizer written as a GGUF file, offline.

The weights go in as llama.cpp's converter writes them (q and k rows permuted for its rotary
layout), so `transformers` reading the file gives back the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_NORMAL, _CONTROL = 1, 3  # GGUF token types


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path: Path, model: torch.nn.Module, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    """Writes a `transformers` Llama model and a byte-level BPE tokenizer as one GGUF file."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokenizer))

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [token for token, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([_CONTROL if token in special else _NORMAL for token in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    for name, tensor in model.state_dict().items():
        weight = tensor.detach().float().numpy()
        if name in _GLOBAL_NAMES:
            writer.add_tensor(_GLOBAL_NAMES[name], weight)
            continue
        _, _, layer, *rest = name.split(".")
        local = ".".join(rest)
        if local == "self_attn.q_proj.weight":
            weight = _permute(weight, config.num_attention_heads)
        elif local == "self_attn.k_proj.weight":
            weight = _permute(weight, config.num_key_value_heads)
        writer.add_tensor(f"blk.{layer}.{_LAYER_NAMES[local]}", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
