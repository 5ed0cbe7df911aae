"""Adapter files: cpt's own layout and PEFT's, both safetensors (no pickle anywhere).

PEFT's layout, read and written so adapters move both ways::

    adapter_config.json         the config fields, peft_type "CPT", token_dim, ...
    adapter_model.safetensors   prompt_embeddings: (N, d) float32 = base + projected delta

cpt's layout keeps ``base`` and ``delta`` apart, so resumed training stays inside the original
balls (PEFT's layout cannot: loading it makes the trained point the new centre)::

    cpt_config.json             {"format": "cpt", "format_version": 1, "config": {...},
                                 "hidden_size": d, "vocab_size": V, "weights_sha256": ...,
                                 "base_model_name_or_path": str or null,
                                 "task": {"template": {...}, "labels": [...]} or null}
    cpt_adapter.safetensors     base: (N, d) float32, delta: (N, d) float32

The folder is written as a whole (`cpt._io.write_folder`): a reader or a crash sees the old
adapter or the new one, and saving one layout removes the other's files. `read_adapter` checks
every field, tensor and the fit to the model before anything is built. This module knows the
model only through the facts it is given (hidden size, vocabulary size, input embeddings).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from cpt import _io
from cpt._fields import check_path
from cpt.config import (
    ADAPTER_FILES, CPT_CONFIG_NAME, CPT_WEIGHTS_NAME, PEFT_CONFIG_NAME, PEFT_TYPE, PEFT_WEIGHTS_NAME, AdapterFormat,
    CPTConfig, check_adapter_format,
)
from cpt.data import Template
from cpt.projection import epsilons
from cpt.schema import (
    ANY,
    SHA256_HEX,
    Built,
    Choice,
    Int,
    Items,
    Nullable,
    Record,
    Text,
    check_header,
    validate,
)

PEFT_WEIGHTS_KEY = "prompt_embeddings"
FORMAT_VERSION = 1

BALL_TOLERANCE = 1e-4
"""Relative slack of the check that a saved delta lies in its balls (float rounding)."""

BASE_TOLERANCE = 2e-2
"""Largest relative distance of a saved base row from the model's embedding of its token: wide
enough for a model loaded in bfloat16 or float16, far below a different model's embeddings."""

BALL_ABS_TOLERANCE = 1e-30
"""Added to each ball's radius in the check of a saved delta, so a zero radius (a frozen row)
still takes a zero delta after rounding."""

MIN_EMBEDDING_NORM = 1e-6
"""Norm below which a model's embedding counts as this much in `BASE_TOLERANCE`'s relative
distance (an all-zero row would otherwise divide by zero)."""

MAX_CONFIG_BYTES = 64 * 2**20
"""The largest adapter config read: a config holds the context's token ids and the label set,
kilobytes even for long contexts; a larger file is refused before it is read."""

SAFETENSORS_HEADER_BYTES = 2**20
"""Room a weights file may take beyond its tensors' bytes: the safetensors header (a few hundred
bytes for cpt's and PEFT's files) with ample slack for another writer's metadata."""

WEIGHTS_DTYPE = torch.float32  # both layouts store their (N, d) tensors so


def weights_limit(num_tensors: int, rows: int, hidden_size: int) -> int:
    """The most bytes a weights file of ``num_tensors`` float32 (rows, hidden_size) tensors may
    hold: larger files are refused before they are read, so a huge file cannot exhaust memory."""
    return num_tensors * rows * hidden_size * WEIGHTS_DTYPE.itemsize + SAFETENSORS_HEADER_BYTES


_TEMPLATE_FIELDS = dict.fromkeys((f.name for f in fields(Template)), ANY)  # Template checks their values
TASK_SCHEMA = Record(
    {
        "template": Nullable(Built(lambda given: Template(**given), Record(_TEMPLATE_FIELDS, frozenset(_TEMPLATE_FIELDS)))),
        "labels": Nullable(Items(Text(non_empty=True), non_empty=True, unique=True)),
    },
    optional=frozenset({"template", "labels"}),
)
"""The task a model was trained for: ``{"template": Template's fields, "labels": [...]}``, either
part absent or null."""

CPT_CONFIG_SCHEMA = Record(
    {
        "format": Choice("cpt"),
        "format_version": Int(min=1),
        "config": Built(CPTConfig.from_dict),
        "hidden_size": Int(min=1),
        "vocab_size": Int(min=1),
        "weights_sha256": SHA256_HEX,
        "base_model_name_or_path": Nullable(Text()),
        "task": Nullable(TASK_SCHEMA),
    },
    optional=frozenset({"base_model_name_or_path", "task"}),
    extra=ANY,
)
"""cpt's ``cpt_config.json`` (the module docstring shows one)."""

PEFT_CONFIG_SCHEMA = Built(
    CPTConfig.from_dict, Record({"peft_type": Choice(PEFT_TYPE), "token_dim": Int(min=1)}, extra=ANY)
)
"""PEFT's ``adapter_config.json``: the config's fields among PEFT's own."""


@dataclass
class AdapterFiles:
    """What an adapter folder holds, checked (`read_adapter`).

    Attributes:
        format: the layout it was read from.
        config: the context's config.
        base: (N, d) float32, the context's original embeddings (PEFT's layout: the trained ones).
        delta: (N, d) float32, the trained offsets (PEFT's layout: zeros).
        task: ``{"template": {...}, "labels": [...]}`` or None.
    """

    format: AdapterFormat
    config: CPTConfig
    base: torch.Tensor
    delta: torch.Tensor
    task: dict[str, Any] | None


def write_adapter(
    path: str | Path,
    config: CPTConfig,
    base: torch.Tensor,
    delta: torch.Tensor,
    *,
    vocab_size: int,
    task: dict[str, Any] | None = None,
    base_model_name_or_path: str | None = None,
    format: AdapterFormat = "cpt",
) -> Path:
    """Writes an adapter folder, replacing whatever adapter was there as a whole.

    Files of other tools in the folder (anything but the two layouts' files) are kept.

    Args:
        path: the folder.
        config: the context's config.
        base: (N, d) the context's original embeddings.
        delta: (N, d) the trained offsets, projected.
        vocab_size: rows of the model's input embeddings (recorded, checked on load).
        task: the template and label set, or None.
        base_model_name_or_path: recorded for information (and for PEFT's loaders).
        format: ``"cpt"`` (base and delta apart) or ``"peft"`` (PEFT's layout).

    Returns:
        The folder.

    Raises:
        ValueError: on a path that is not a non-empty str or PathLike, an unknown format,
            weights that are not finite, or a path that is a file.
    """
    check_path(path, "path")
    check_adapter_format(format)
    base = base.detach().to("cpu", WEIGHTS_DTYPE).contiguous()
    delta = delta.detach().to("cpu", WEIGHTS_DTYPE).contiguous()
    if not (bool(torch.isfinite(base).all()) and bool(torch.isfinite(delta).all())):
        raise ValueError("cannot save the adapter: its weights hold NaN or inf")
    validate(task, Nullable(TASK_SCHEMA), Path(path) / CPT_CONFIG_NAME, "task")
    hidden_size = int(base.shape[1])

    def fill(folder: Path) -> None:
        if format == "peft":
            weights = safetensors_bytes({PEFT_WEIGHTS_KEY: base + delta}, metadata={"format": "pt"})
            _io.write_bytes(folder / PEFT_WEIGHTS_NAME, weights)
            _io.write_json(folder / PEFT_CONFIG_NAME, config.to_peft_dict(hidden_size, base_model_name_or_path))
            return
        weights = safetensors_bytes({"base": base, "delta": delta}, metadata={"format": "cpt"})
        _io.write_bytes(folder / CPT_WEIGHTS_NAME, weights)
        _io.write_json(
            folder / CPT_CONFIG_NAME,
            {
                "format": "cpt",
                "format_version": FORMAT_VERSION,
                "config": config.to_dict(),
                "hidden_size": hidden_size,
                "vocab_size": int(vocab_size),
                "base_model_name_or_path": base_model_name_or_path,
                "weights_sha256": hashlib.sha256(weights).hexdigest(),
                "task": task,
            },
        )

    return _io.write_folder(path, fill, keep=lambda name: name not in ADAPTER_FILES)


def save_adapter(model: Any, path: str | Path, format: AdapterFormat = "cpt") -> Path:
    """Writes ``model``'s adapter into the folder ``path`` (created if needed), as it is.

    Args:
        model: a `CPTModel`; saved without projecting (`CPTModel.save_pretrained` projects first).
        path: the folder; an adapter already there is replaced as a whole, other files kept.
        format: ``"cpt"`` (base and delta apart) or ``"peft"`` (PEFT's layout).

    Returns:
        The folder.

    Raises:
        ValueError: if ``model`` is not a `CPTModel`, and as `write_adapter`.
    """
    if not callable(getattr(model, "adapter_state_dict", None)):  # duck-typed: this module sits below cpt.model
        raise ValueError(f"model must be a CPTModel, got {type(model).__name__}")
    state = model.adapter_state_dict()
    return write_adapter(
        path,
        model.config,
        state["base"],
        state["delta"],
        vocab_size=int(model.base_model.get_input_embeddings().weight.shape[0]),
        task=model.task,
        base_model_name_or_path=getattr(model.base_model.config, "_name_or_path", None) or None,
        format=format,
    )


def adapter_format(path: str | Path) -> AdapterFormat:
    """Which layout the folder ``path`` holds.

    Raises:
        ValueError: if ``path`` is not a path, or the folder is missing or holds neither layout.
    """
    check_path(path, "path")
    return _io.open_folder(path, _format_of, "adapter")


def read_adapter(
    path: str | Path,
    *,
    hidden_size: int,
    vocab_size: int,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> AdapterFiles:
    """Reads and checks an adapter folder of either layout, from a single save.

    Args:
        path: the folder.
        hidden_size: the model's embedding size d.
        vocab_size: rows of the model's input embeddings.
        embed: the model's input embedding (ids (N,) -> (N, d), e.g. its embedding module, which
            may scale); if given, the saved base rows must be (close to) its embeddings of the
            context's token ids.

    Returns:
        The checked `AdapterFiles`.

    Raises:
        ValueError: one problem, naming the file, the field and the value.
    """
    return _io.open_folder(
        path, lambda folder: read_adapter_folder(folder, hidden_size, vocab_size, embed), "adapter"
    )


def read_adapter_folder(
    folder: _io.Folder,
    hidden_size: int,
    vocab_size: int,
    embed: Callable[[torch.Tensor], torch.Tensor] | None,
) -> AdapterFiles:
    """`read_adapter` on an open folder (a checkpoint reads its ``adapter/`` this way)."""
    fmt = _format_of(folder)
    if fmt == "cpt":
        files = _read_cpt(folder, hidden_size, vocab_size)
    else:
        files = _read_peft(folder, hidden_size)
    _check_fit(folder.path, files, vocab_size, embed)
    return files


# ---------------------------------------------------------------------- reading


def _format_of(folder: _io.Folder) -> AdapterFormat:
    if folder.is_file(CPT_CONFIG_NAME) and folder.is_file(PEFT_CONFIG_NAME):  # a save keeps one only
        raise ValueError(
            f"{folder.path} holds both {CPT_CONFIG_NAME} and {PEFT_CONFIG_NAME}: two adapters, and PEFT would "
            "load the other one; keep one of them"
        )
    if folder.is_file(CPT_CONFIG_NAME):
        return "cpt"
    if folder.is_file(PEFT_CONFIG_NAME):
        return "peft"
    raise ValueError(f"{folder.path} holds no adapter: neither {CPT_CONFIG_NAME} nor {PEFT_CONFIG_NAME} is there")


def _read_cpt(folder: _io.Folder, hidden_size: int, vocab_size: int) -> AdapterFiles:
    where = folder.path / CPT_CONFIG_NAME
    meta = folder.read_json(CPT_CONFIG_NAME, "adapter config", MAX_CONFIG_BYTES)
    check_header(meta, where, "cpt", FORMAT_VERSION)
    validate(meta, CPT_CONFIG_SCHEMA, where)
    config = CPTConfig.from_dict(meta["config"])
    _check_size(where, "hidden_size", meta["hidden_size"], hidden_size, "hidden size")
    _check_size(where, "vocab_size", meta["vocab_size"], vocab_size, "vocabulary size")
    limit = weights_limit(2, config.num_virtual_tokens, hidden_size)
    raw = folder.read_bytes(CPT_WEIGHTS_NAME, "adapter weights", limit)
    if hashlib.sha256(raw).hexdigest() != meta["weights_sha256"]:
        raise ValueError(
            f"{folder.path / CPT_WEIGHTS_NAME} does not match {CPT_CONFIG_NAME} (checksum differs): "
            "the folder holds files from two different saves, or a damaged file"
        )
    tensors = _tensors(folder.path / CPT_WEIGHTS_NAME, raw, {"base", "delta"}, config.num_virtual_tokens, hidden_size)
    base, delta = tensors["base"], tensors["delta"]
    radius = epsilons(config, hidden_size)
    norms = torch.linalg.vector_norm(delta.double(), dim=1)
    outside = (norms > radius.double() * (1 + BALL_TOLERANCE) + BALL_ABS_TOLERANCE).nonzero().flatten()
    if len(outside):
        row = int(outside[0])
        raise ValueError(
            f"{folder.path / CPT_WEIGHTS_NAME}: tensor 'delta' row {row} has norm {float(norms[row]):.6g}, "
            f"outside its ball of radius {float(radius[row]):.6g}"
        )
    return AdapterFiles("cpt", config, base, delta, meta.get("task"))


def _read_peft(folder: _io.Folder, hidden_size: int) -> AdapterFiles:
    where = folder.path / PEFT_CONFIG_NAME
    data = folder.read_json(PEFT_CONFIG_NAME, "adapter config", MAX_CONFIG_BYTES)
    validate(data, PEFT_CONFIG_SCHEMA, where)
    config = CPTConfig.from_dict(data)
    _check_size(where, "token_dim", data["token_dim"], hidden_size, "hidden size")
    limit = weights_limit(1, config.num_virtual_tokens, hidden_size)
    raw = folder.read_bytes(PEFT_WEIGHTS_NAME, "adapter weights", limit)
    weights_path = folder.path / PEFT_WEIGHTS_NAME
    tensors = _tensors(weights_path, raw, {PEFT_WEIGHTS_KEY}, config.num_virtual_tokens, hidden_size)
    # PEFT keeps only base + delta: the saved point becomes the new centre.
    base = tensors[PEFT_WEIGHTS_KEY]
    return AdapterFiles("peft", config, base, torch.zeros_like(base), None)


def _check_size(where: Path, name: str, saved: int, actual: int, what: str) -> None:
    """A size the file records (checked an integer >= 1) is the model's."""
    if saved != actual:
        raise ValueError(
            f"{where}: field {name!r} is {saved}: the adapter is for {what} {saved}, but the model's is {actual}"
        )


def _tensors(path: Path, raw: bytes, names: set[str], rows: int, hidden_size: int) -> dict[str, torch.Tensor]:
    try:
        tensors = safetensors_load(raw)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, MemoryError) as error:
        raise ValueError(f"{path} is not a valid safetensors file: {error}") from None
    for name in sorted(names):
        if name not in tensors:
            raise ValueError(f"{path} has no tensor {name!r} (it has {sorted(tensors)})")
    extra = sorted(set(tensors) - names)
    if extra:
        raise ValueError(f"{path} has unexpected tensors {extra} (expected {sorted(names)})")
    for name in sorted(names):
        tensor = tensors[name]
        if tuple(tensor.shape) != (rows, hidden_size):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {(rows, hidden_size)}"
            )
        if tensor.dtype != WEIGHTS_DTYPE:
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected float32")
        bad = (~torch.isfinite(tensor)).nonzero()
        if len(bad):
            row, column = (int(x) for x in bad[0])
            raise ValueError(
                f"{path}: tensor {name!r} holds {float(tensor[row, column])} at row {row}, column {column}"
            )
    return tensors


def _check_fit(
    path: Path, files: AdapterFiles, vocab_size: int, embed: Callable[[torch.Tensor], torch.Tensor] | None
) -> None:
    ids = files.config.cpt_token_ids
    too_big = [i for i in ids if i >= vocab_size]
    if too_big:
        raise ValueError(
            f"{path}: config field 'cpt_token_ids' holds id {too_big[0]}, outside the model's "
            f"vocabulary of {vocab_size}"
        )
    if embed is None:
        return
    with torch.no_grad():
        expected = embed(torch.tensor(ids)).detach().to("cpu", torch.float64)
    saved = files.base.double()
    if files.format == "peft":  # the trained rows: within their balls of the model's embeddings
        slack = epsilons(files.config, files.base.shape[1]).double() * (1 + BALL_TOLERANCE)
    else:
        slack = torch.zeros(len(ids), dtype=torch.float64)
    distance = torch.linalg.vector_norm(saved - expected, dim=1)
    scale = torch.linalg.vector_norm(expected, dim=1).clamp_min(MIN_EMBEDDING_NORM)
    far = (distance > slack + BASE_TOLERANCE * scale).nonzero().flatten()
    if len(far):
        row = int(far[0])
        raise ValueError(
            f"{path}: the adapter's context embeddings do not match the model's: row {row} (token id "
            f"{ids[row]}) is {float(distance[row]):.4g} away from the model's embedding of norm "
            f"{float(scale[row]):.4g}: an adapter for another model?"
        )

