"""Adapter files: cpt's own layout and PEFT's, both safetensors (no pickle anywhere).

PEFT's layout (SPEC §6), read and written so adapters move both ways::

    adapter_config.json         the config fields, peft_type "CPT", token_dim, ...
    adapter_model.safetensors   prompt_embeddings: (N, d) float32 = base + projected delta

cpt's layout keeps ``base`` and ``delta`` apart, so resumed training stays inside the original
balls (PEFT's layout cannot: loading it makes the trained point the new centre)::

    cpt_config.json             {"format": "cpt", "format_version": 1, "config": {...},
                                 "hidden_size": d, "vocab_size": V, "weights_sha256": ...,
                                 "task": {"template": {...}, "labels": [...]} or null}
    cpt_adapter.safetensors     base: (N, d) float32, delta: (N, d) float32

Each file is written atomically, weights first; the config records the weights' checksum, so a
folder whose files do not belong together is reported instead of loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from torch import nn

from cpt._io import atomic_save_tensors, atomic_write_json, read_file_bytes, read_json_object
from cpt.config import CPTConfig
from cpt.model import CPTModel

CPT_CONFIG_NAME = "cpt_config.json"
CPT_WEIGHTS_NAME = "cpt_adapter.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_WEIGHTS_KEY = "prompt_embeddings"
FORMAT_VERSION = 1

AdapterFormat = Literal["cpt", "peft"]


def save_adapter(model: CPTModel, path: str | Path, format: AdapterFormat = "cpt") -> Path:
    """Writes ``model``'s adapter into the folder ``path`` (created if needed).

    Args:
        model: the trained model; saved as it is (call ``project_`` first, as
            `CPTModel.save_pretrained` does).
        path: the folder. Other files in it are left alone.
        format: ``"cpt"`` (base and delta apart) or ``"peft"`` (PEFT's layout).

    Returns:
        The folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot save adapter: {path} exists and is not a folder")
    state = model.adapter_state_dict()
    name_or_path = getattr(model.base_model.config, "_name_or_path", None) or None
    if format == "peft":
        atomic_save_tensors(
            path / PEFT_WEIGHTS_NAME,
            {PEFT_WEIGHTS_KEY: (state["base"] + state["delta"]).float()},
            metadata={"format": "pt"},
        )
        atomic_write_json(path / PEFT_CONFIG_NAME, model.config.to_peft_dict(model.hidden_size, name_or_path))
        return path
    if format != "cpt":
        raise ValueError(f"format must be 'cpt' or 'peft', got {format!r}")
    data = atomic_save_tensors(path / CPT_WEIGHTS_NAME, state, metadata={"format": "cpt"})
    meta = {
        "format": "cpt",
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "hidden_size": model.hidden_size,
        "vocab_size": int(model.base_model.get_input_embeddings().weight.shape[0]),
        "base_model_name_or_path": name_or_path,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "task": model.task,
    }
    atomic_write_json(path / CPT_CONFIG_NAME, meta)
    return path


def adapter_format(path: str | Path) -> AdapterFormat:
    """Which layout the folder ``path`` holds.

    Raises:
        ValueError: if it is missing or holds neither layout.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"no adapter folder at {path}")
    if (path / CPT_CONFIG_NAME).is_file():
        return "cpt"
    if (path / PEFT_CONFIG_NAME).is_file():
        return "peft"
    raise ValueError(f"{path} holds no adapter: neither {CPT_CONFIG_NAME} nor {PEFT_CONFIG_NAME} is there")


def load_adapter(base_model: nn.Module, path: str | Path, **model_kwargs: Any) -> CPTModel:
    """Loads an adapter folder of either layout onto ``base_model``.

    Args:
        base_model: the causal LM the adapter was trained on (same hidden size and vocabulary).
        path: the folder.
        **model_kwargs: passed to `CPTModel` (``context_sharing``, ``compile_projection``).

    Returns:
        A `CPTModel` whose ``context_embeddings()`` equal the saved ones exactly.

    Raises:
        ValueError: naming what is missing, malformed, or does not match the model.
    """
    path = Path(path)
    fmt = adapter_format(path)
    hidden_size = int(base_model.get_input_embeddings().weight.shape[1])
    if fmt == "cpt":
        meta = _read_json(path / CPT_CONFIG_NAME)
        if meta.get("format") != "cpt" or not isinstance(meta.get("config"), dict):
            raise ValueError(f"{path / CPT_CONFIG_NAME} is not a cpt adapter config")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{path} was written by a newer cpt (format version {meta['format_version']}); upgrade cpt"
            )
        config = CPTConfig.from_dict(meta["config"])
        _check_hidden_size(path, meta.get("hidden_size"), hidden_size)
        raw = _read_bytes(path / CPT_WEIGHTS_NAME)
        expected = meta.get("weights_sha256")
        if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
            raise ValueError(
                f"{path / CPT_WEIGHTS_NAME} does not match {CPT_CONFIG_NAME} (checksum differs): "
                "the folder holds files from two different saves"
            )
        tensors = _parse_tensors(path / CPT_WEIGHTS_NAME, raw)
        base, delta = (_tensor(tensors, key, path / CPT_WEIGHTS_NAME, config, hidden_size) for key in ("base", "delta"))
    else:
        data = _read_json(path / PEFT_CONFIG_NAME)
        config = CPTConfig.from_dict(data)
        _check_hidden_size(path, data.get("token_dim"), hidden_size)
        weights_path = path / PEFT_WEIGHTS_NAME
        tensors = _parse_tensors(weights_path, _read_bytes(weights_path))
        # PEFT keeps only base + delta: the saved point becomes the new centre.
        base = _tensor(tensors, PEFT_WEIGHTS_KEY, weights_path, config, hidden_size)
        delta = torch.zeros_like(base)
    model = CPTModel(base_model, config, **model_kwargs)
    if fmt == "cpt" and isinstance(meta.get("task"), dict):
        model.task = meta["task"]
    with torch.no_grad():
        model.base.copy_(base)
        model.delta.copy_(delta)
    return model


def _check_hidden_size(path: Path, saved: Any, hidden_size: int) -> None:
    if saved is not None and int(saved) != hidden_size:
        raise ValueError(f"adapter at {path} is for hidden size {saved}, but the model's is {hidden_size}")


def _read_bytes(path: Path) -> bytes:
    return read_file_bytes(path, "adapter weights")


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "adapter config")


def _parse_tensors(path: Path, raw: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} is not a valid safetensors file: {error}") from None


def _tensor(
    tensors: dict[str, torch.Tensor], key: str, path: Path, config: CPTConfig, hidden_size: int
) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{path} has no tensor {key!r} (it has {sorted(tensors)})")
    tensor = tensors[key]
    expected = (config.num_virtual_tokens, hidden_size)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {expected}")
    if not torch.is_floating_point(tensor):
        raise ValueError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected float32")
    return tensor.float()
