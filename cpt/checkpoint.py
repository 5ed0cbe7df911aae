"""Resumable training state: one folder, written as a whole, read back only after checking it all.

Layout::

    adapter/                    the adapter in cpt's layout (`cpt.adapter.write_adapter`)
    trainer_state.safetensors   optimizer tensors (``optimizer.<param>.<name>``) and RNG states
                                (``rng.torch``, ``rng.cuda.<i>``)
    trainer_state.json          step, epoch, position, config, losses, evaluations, optimizer
                                param groups and scalars, Python RNG state, the SHA-256 of every
                                other file, and its own (``state_sha256``)

No pickle: safetensors for tensors, JSON for the rest. `save_checkpoint` replaces the folder as a
whole (`cpt._io.write_folder`: a crash or a reader sees the previous checkpoint or the new one,
and two runs saving into one folder take turns under a lock). `load_checkpoint` checks every field
and its range, every file's checksum and the fit to the model, the config and the data set before
it changes the model, the optimizer or an RNG.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from cpt import _io
from cpt._fields import check_header, is_finite, is_int, is_number, show
from cpt.adapter import (
    CPT_CONFIG_NAME,
    CPT_WEIGHTS_NAME,
    MAX_CONFIG_BYTES,
    SAFETENSORS_HEADER_BYTES,
    read_adapter_folder,
    weights_limit,
    write_adapter,
)

if TYPE_CHECKING:
    from cpt.model import CPTModel

STATE_FORMAT = "cpt-trainer-state"
CHECKPOINT_FORMAT_VERSION = 2  # 2: checksums of every file; 1 checked the tensors file only
ADAPTER_DIR = "adapter"  # the adapter, in cpt's layout (base and delta apart)
STATE_TENSORS_NAME = "trainer_state.safetensors"  # optimizer moments, RNG states
STATE_JSON_NAME = "trainer_state.json"  # step, epoch, ..., and the checksums of the other files
LAST_CHECKPOINT_NAME = "last"  # `train` keeps one rolling checkpoint, checkpoint_dir / "last"
CHECKSUMMED_FILES = (f"{ADAPTER_DIR}/{CPT_CONFIG_NAME}", f"{ADAPTER_DIR}/{CPT_WEIGHTS_NAME}", STATE_TENSORS_NAME)

ORDER_FIELDS = ("seed", "batch_size", "gradient_accumulation_steps")
"""TrainConfig fields that decide which samples each step sees: a resume must keep them."""

MAX_STATE_JSON_BYTES = 256 * 2**20  # steps' losses and evaluations: far more than a run writes
OPTIMIZER_TENSORS = 4  # per-parameter tensors a trainer state may hold: AdamW keeps 2, 3 with amsgrad
RNG_STATE_BYTES = 2**20  # the RNG states of the CPU and every GPU: a few KiB each
_MT_STATE_LENGTH = 625  # Python's Mersenne Twister: 624 words and an index


@dataclass
class TrainState:
    """Where a run stands between two optimizer steps: everything a resume needs but tensors.

    Attributes:
        step: optimizer steps done.
        epoch: the epoch the next batch belongs to.
        position: batches of that epoch already consumed.
        losses: per-step losses so far (one per step).
        eval_history: evaluations so far, each ``{"step": s, name: value, ...}``.
    """

    step: int = 0
    epoch: int = 0
    position: int = 0
    losses: list[float] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(
    folder: str | Path,
    model: CPTModel,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config: Any,
    *,
    num_samples: int,
) -> Path:
    """Writes a resumable training state into ``folder``, replacing it as a whole.

    The folder is built under a temporary sibling and swapped in whole (`cpt._io.write_folder`):
    a crash while saving leaves the previous checkpoint, a concurrent reader sees one of the two,
    and two runs saving into one folder take turns instead of deleting each other's folders.

    Args:
        folder: the checkpoint folder to create or replace.
        model: the model being trained (saved as it is: delta is projected after every step).
        optimizer: its optimizer (`cpt.train.make_optimizer`).
        state: where the run stands.
        config: the run's `cpt.train.TrainConfig` (recorded, and checked on resume).
        num_samples: the dataset's length (checked on resume).

    Returns:
        The folder.

    Raises:
        ValueError: if ``state`` does not fit ``config`` and ``num_samples``, the weights are not
            finite, or ``folder`` is a file.
    """
    folder = Path(folder)
    config_dict = config.to_dict()
    _check_state(folder / STATE_JSON_NAME, _state_json(state, num_samples), config_dict)
    tensors, optimizer_json = _optimizer_to_tensors(optimizer)
    tensors.update(_rng_tensors())
    state_tensors = safetensors_bytes(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": STATE_FORMAT}
    )
    python_rng = _python_rng_to_json(random.getstate())
    adapter = model.adapter_state_dict()

    def fill(tmp: Path) -> None:
        write_adapter(
            tmp / ADAPTER_DIR,
            model.config,
            adapter["base"],
            adapter["delta"],
            vocab_size=int(model.base_model.get_input_embeddings().weight.shape[0]),
            task=model.task,
        )
        _io.write_bytes(tmp / STATE_TENSORS_NAME, state_tensors)
        meta = {
            "format": STATE_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            **_state_json(state, num_samples),
            "config": config_dict,
            "optimizer": optimizer_json,
            "python_rng": python_rng,
            "files_sha256": {name: _sha256((tmp / name).read_bytes()) for name in CHECKSUMMED_FILES},
        }
        meta["state_sha256"] = _sha256(_io.json_bytes(meta))
        _io.write_bytes(tmp / STATE_JSON_NAME, _io.json_bytes(meta))

    return _io.write_folder(folder, fill)


def load_checkpoint(
    folder: str | Path,
    model: CPTModel,
    optimizer: torch.optim.Optimizer,
    *,
    config: Any | None = None,
    num_samples: int | None = None,
) -> TrainState:
    """Restores a checkpoint into ``model``, ``optimizer`` and the global RNGs.

    Everything is read and checked first; nothing changes unless all of it is sound. The
    optimizer's moments and step counts come from the checkpoint; its hyper-parameters (learning
    rate, weight decay) stay those it was built with, i.e. the current config's.

    Args:
        folder: a folder written by `save_checkpoint`.
        model: a model with the same context and base model as the one saved.
        optimizer: a fresh optimizer over ``model.trainable_parameters()``.
        config: if given, its ``seed``, ``batch_size`` and ``gradient_accumulation_steps`` must
            equal the saved ones (they decide the sample order).
        num_samples: if given, must equal the saved dataset length.

    Returns:
        The `TrainState` to continue from.

    Raises:
        ValueError: one problem, naming the file, the field and the value: a missing or
            incomplete checkpoint, a file whose checksum differs, a field of the wrong type or
            out of range, or a mismatch with the model, the config or the dataset.
    """
    weights = model.base_model.get_input_embeddings().weight
    limits = _file_limits(int(model.delta.shape[0]), int(weights.shape[1]))
    loaded = _io.open_folder(
        folder,
        lambda f: _read_checkpoint(f, int(weights.shape[1]), int(weights.shape[0]), limits),
        "checkpoint",
    )
    meta, tensors, adapter = loaded
    where = Path(folder) / STATE_JSON_NAME
    saved_config = meta["config"]
    if config is not None:
        for name in ORDER_FIELDS:
            if saved_config[name] != getattr(config, name):
                raise ValueError(
                    f"cannot resume from {folder}: it was trained with {name}={saved_config[name]!r}, "
                    f"the config has {name}={getattr(config, name)!r} (the sample order would differ)"
                )
    if num_samples is not None and meta["num_samples"] != num_samples:
        raise ValueError(
            f"cannot resume from {folder}: it was trained on {meta['num_samples']} samples, "
            f"the dataset has {num_samples}"
        )
    _check_adapter_matches(Path(folder) / ADAPTER_DIR, adapter, model)
    optimizer_state = _optimizer_from_tensors(meta["optimizer"], tensors, tuple(model.delta.shape), where)

    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    previous = optimizer.state_dict()
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, RuntimeError, TypeError) as error:
        optimizer.load_state_dict(previous)
        raise ValueError(f"cannot load the optimizer state of {folder}: {error}") from None
    for group, values in zip(optimizer.param_groups, hyper):
        group.update(values)  # the current config's hyper-parameters
    with torch.no_grad():
        model.delta.copy_(adapter.delta)
    _restore_rng(tensors, meta["python_rng"])
    return TrainState(
        step=meta["step"],
        epoch=meta["epoch"],
        position=meta["position"],
        losses=[float(x) for x in meta["losses"]],
        eval_history=[
            {k: _float_from_json(v) if k != "step" else v for k, v in e.items()} for e in meta["eval_history"]
        ],
    )


# ---------------------------------------------------------------------- reading and checking


def _file_limits(rows: int, hidden_size: int) -> dict[str, int]:
    """The most bytes each checksummed file may hold for a context of ``rows`` x ``hidden_size``:
    checked before a file is read, so a huge one is refused instead of exhausting memory."""
    # optimizer moments may be float64: 8 bytes an entry
    state = OPTIMIZER_TENSORS * rows * hidden_size * 8 + RNG_STATE_BYTES + SAFETENSORS_HEADER_BYTES
    return {
        f"{ADAPTER_DIR}/{CPT_CONFIG_NAME}": MAX_CONFIG_BYTES,
        f"{ADAPTER_DIR}/{CPT_WEIGHTS_NAME}": weights_limit(2, rows, hidden_size),
        STATE_TENSORS_NAME: state,
    }


def _read_checkpoint(
    folder: _io.Folder, hidden_size: int, vocab_size: int, limits: Mapping[str, int]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    where = folder.path / STATE_JSON_NAME
    if not folder.is_file(STATE_JSON_NAME):
        raise ValueError(f"no complete checkpoint at {folder.path}: {STATE_JSON_NAME} is missing")
    raw_meta = folder.read_bytes(STATE_JSON_NAME, "checkpoint state", MAX_STATE_JSON_BYTES)
    meta = _io.parse_json_object(raw_meta, where, "checkpoint state")
    version = check_header(meta, where, STATE_FORMAT, CHECKPOINT_FORMAT_VERSION)
    if version < CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{folder.path} was written by an older cpt (format {version}, which did not checksum every "
            "file): it cannot be checked, start a fresh run"
        )
    recorded = meta.get("state_sha256")
    body = {k: v for k, v in meta.items() if k != "state_sha256"}
    if not isinstance(recorded, str) or _sha256(_io.json_bytes(body)) != recorded:
        raise ValueError(
            f"{where}: field 'state_sha256' is {show(recorded)}, which is not the checksum of the file's "
            "other fields: the file was changed or damaged"
        )
    checksums = meta.get("files_sha256")
    if not isinstance(checksums, dict) or sorted(checksums) != sorted(CHECKSUMMED_FILES):
        raise ValueError(
            f"{where}: field 'files_sha256' must map exactly {sorted(CHECKSUMMED_FILES)} to checksums, "
            f"got {show(checksums)}"
        )
    contents = {}
    for name in CHECKSUMMED_FILES:
        parent, _, leaf = name.rpartition("/")
        holder = folder.folder(parent) if parent else folder
        contents[name] = holder.read_bytes(leaf, "checkpoint file", limits[name])
        if _sha256(contents[name]) != checksums[name]:
            raise ValueError(
                f"{folder.path / name} does not match {STATE_JSON_NAME} (checksum differs): the file was "
                "replaced, changed or damaged"
            )
    _check_state(where, meta, meta.get("config"))
    # embeddings are compared exactly afterwards (`_check_adapter_matches`), not within rounding
    adapter = read_adapter_folder(folder.folder(ADAPTER_DIR), hidden_size, vocab_size, None)
    tensors_path = folder.path / STATE_TENSORS_NAME
    try:
        tensors = safetensors_load(contents[STATE_TENSORS_NAME])
    except (SafetensorError, ValueError, RuntimeError, OverflowError, MemoryError) as error:
        raise ValueError(f"{tensors_path} is not a valid safetensors file: {error}") from None
    _check_rng(tensors, meta.get("python_rng"), tensors_path, where)
    return meta, tensors, adapter


def _state_json(state: TrainState, num_samples: int) -> dict[str, Any]:
    return {
        "step": state.step,
        "epoch": state.epoch,
        "position": state.position,
        "num_samples": num_samples,
        "losses": list(state.losses),
        "eval_history": [
            {k: (v if k == "step" else _float_to_json(v)) for k, v in entry.items()} for entry in state.eval_history
        ],
    }


def _check_state(where: Path, meta: Mapping[str, Any], config: Any) -> None:
    """Checks step, epoch, position, samples, losses, evaluations and the order fields."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: field 'config' must be an object, got {show(config)}")
    for name in ORDER_FIELDS:
        minimum = 0 if name == "seed" else 1
        if not is_int(config.get(name)) or config[name] < minimum:
            got = show(config.get(name))
            raise ValueError(f"{where}: field 'config.{name}' must be an integer >= {minimum}, got {got}")
    for name, minimum in (("step", 0), ("epoch", 0), ("position", 0), ("num_samples", 1)):
        value = meta.get(name)
        if not is_int(value) or value < minimum:
            raise ValueError(f"{where}: field {name!r} must be an integer >= {minimum}, got {show(value)}")
    step, epoch, position = meta["step"], meta["epoch"], meta["position"]
    accumulation = config["gradient_accumulation_steps"]
    batches = math.ceil(meta["num_samples"] / config["batch_size"])
    steps_per_epoch = math.ceil(batches / accumulation)
    if position >= batches or position % accumulation:
        raise ValueError(
            f"{where}: field 'position' is {position}, but an epoch of {meta['num_samples']} samples has "
            f"{batches} batches, consumed {accumulation} per step"
        )
    if step != epoch * steps_per_epoch + position // accumulation:
        raise ValueError(
            f"{where}: field 'step' is {step}, but epoch {epoch} and position {position} mean "
            f"{epoch * steps_per_epoch + position // accumulation} steps ({steps_per_epoch} per epoch)"
        )
    losses = meta.get("losses")
    if not isinstance(losses, list) or len(losses) != step:
        length = len(losses) if isinstance(losses, list) else show(losses)
        raise ValueError(f"{where}: field 'losses' must be a list of {step} numbers (one per step), got {length}")
    for i, loss in enumerate(losses):
        if not is_finite(loss):
            raise ValueError(f"{where}: field 'losses[{i}]' must be a finite number, got {show(loss)}")
    history = meta.get("eval_history")
    if not isinstance(history, list):
        raise ValueError(f"{where}: field 'eval_history' must be a list, got {show(history)}")
    for i, entry in enumerate(history):
        if not isinstance(entry, dict) or not is_int(entry.get("step")) or not 1 <= entry["step"] <= step:
            raise ValueError(
                f"{where}: field 'eval_history[{i}]' must be an object with a 'step' in 1..{step}, got {show(entry)}"
            )
        for key, value in entry.items():
            if key != "step" and not (is_number(value) or value in ("nan", "inf", "-inf")):
                raise ValueError(f"{where}: field 'eval_history[{i}].{key}' must be a number, got {show(value)}")


def _check_adapter_matches(adapter_dir: Path, saved: Any, model: CPTModel) -> None:
    """Checks the checkpoint's adapter was trained on this model's context."""
    ignore = {"tokenizer_name_or_path"}
    mine = {k: v for k, v in model.config.to_dict().items() if k not in ignore}
    theirs = {k: v for k, v in saved.config.to_dict().items() if k not in ignore}
    if mine != theirs:
        differing = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise ValueError(
            f"checkpoint adapter {adapter_dir} does not match the model: its config differs in {differing}"
        )
    if not torch.equal(saved.base.to(model.base.device), model.base):
        raise ValueError(
            f"checkpoint adapter {adapter_dir} does not match the model: the context's base embeddings "
            "differ (a different base model?)"
        )


def _check_rng(tensors: dict[str, torch.Tensor], python_rng: Any, tensors_path: Path, where: Path) -> None:
    allowed = {"rng.torch"} | {k for k in tensors if k.startswith("rng.cuda.") or k.startswith("optimizer.")}
    extra = sorted(set(tensors) - allowed)
    if extra:
        raise ValueError(f"{tensors_path} has unexpected tensors {extra}")
    expected = torch.get_rng_state()
    for key in sorted(k for k in tensors if k.startswith("rng.")):
        tensor = tensors[key]
        if tensor.dtype != torch.uint8 or tensor.dim() != 1:
            got = f"{tensor.dtype} {tuple(tensor.shape)}"
            raise ValueError(f"{tensors_path}: tensor {key!r} must be a 1-D uint8 tensor, got {got}")
    if "rng.torch" not in tensors or tensors["rng.torch"].shape != expected.shape:
        shape = tuple(tensors["rng.torch"].shape) if "rng.torch" in tensors else None
        raise ValueError(f"{tensors_path}: tensor 'rng.torch' must have shape {tuple(expected.shape)}, got {shape}")
    ok = (
        isinstance(python_rng, list)
        and len(python_rng) == 3
        and is_int(python_rng[0])
        and isinstance(python_rng[1], list)
        and len(python_rng[1]) == _MT_STATE_LENGTH
        and all(is_int(x) and 0 <= x < 2**32 for x in python_rng[1])
        and python_rng[1][-1] <= _MT_STATE_LENGTH - 1
        and (python_rng[2] is None or is_finite(python_rng[2]))
    )
    if ok:
        try:
            random.Random().setstate(_python_rng_from_json(python_rng))
        except (ValueError, TypeError, OverflowError):
            ok = False
    if not ok:
        raise ValueError(f"{where}: field 'python_rng' is not a Python random state: {show(python_rng)}")


# ---------------------------------------------------------------------- optimizer and RNG


def _optimizer_to_tensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits ``optimizer.state_dict()`` into safetensors tensors and a JSON description."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_json: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        entry: dict[str, Any] = {}
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                key = f"optimizer.{param_id}.{name}"
                tensors[key] = value
                entry[name] = {"tensor": key}
            else:
                entry[name] = {"value": value}
        state_json[str(param_id)] = entry
    return tensors, {"state": state_json, "param_groups": state_dict["param_groups"]}


def _optimizer_from_tensors(
    description: Any, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], where: Path
) -> dict[str, Any]:
    """Rebuilds an ``optimizer.state_dict()`` from `_optimizer_to_tensors`' two parts, checking
    every entry (moments of ``shape``, finite; a scalar step count >= 0)."""
    if not isinstance(description, dict) or set(description) != {"state", "param_groups"}:
        raise ValueError(f"{where}: field 'optimizer' must hold 'state' and 'param_groups', got {show(description)}")
    raw_state, raw_groups = description["state"], description["param_groups"]
    if not isinstance(raw_state, dict) or not isinstance(raw_groups, list) or not raw_groups:
        raise ValueError(f"{where}: field 'optimizer' is malformed: {show(description)}")
    state: dict[int, dict[str, Any]] = {}
    for param_id, entry in raw_state.items():
        if not param_id.isdigit() or not isinstance(entry, dict):
            raise ValueError(f"{where}: field 'optimizer.state.{param_id}' is malformed: {show(entry)}")
        values: dict[str, Any] = {}
        for name, item in entry.items():
            label = f"optimizer.state.{param_id}.{name}"
            if not isinstance(item, dict) or len(item) != 1 or not ({"tensor", "value"} & set(item)):
                raise ValueError(f"{where}: field {label!r} is malformed: {show(item)}")
            if "value" in item:
                value = item["value"]
                if not (value is None or isinstance(value, bool) or is_finite(value)):
                    raise ValueError(f"{where}: field {label!r} must be a finite number, got {show(value)}")
                values[name] = value
                continue
            key = item["tensor"]
            if key not in tensors:
                raise ValueError(f"{where}: field {label!r} names tensor {show(key)}, which is not saved")
            tensor = tensors[key]
            expected = () if name == "step" else shape
            if tuple(tensor.shape) != expected or not torch.is_floating_point(tensor):
                raise ValueError(
                    f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, "
                    f"expected {expected} floating point"
                )
            if not bool(torch.isfinite(tensor).all()) or (name in ("step", "exp_avg_sq") and bool((tensor < 0).any())):
                raise ValueError(f"checkpoint tensor {key!r} holds a value out of range (non-finite or negative)")
            values[name] = tensor
        state[int(param_id)] = values
    groups = []
    for i, group in enumerate(raw_groups):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise ValueError(f"{where}: field 'optimizer.param_groups[{i}]' is malformed: {show(group)}")
        group = dict(group)
        for key, value in group.items():
            bad = isinstance(value, float) and not math.isfinite(value)
            if bad or (key == "betas" and not (isinstance(value, list) and all(is_finite(b) for b in value))):
                raise ValueError(f"{where}: field 'optimizer.param_groups[{i}].{key}' is {show(value)}")
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor], python_rng: Any) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    num_cuda = sum(1 for k in tensors if k.startswith("rng.cuda."))
    if num_cuda and torch.cuda.is_available():
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(min(num_cuda, torch.cuda.device_count()))]
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_python_rng_from_json(python_rng))


def _python_rng_to_json(rng_state: tuple) -> list[Any]:
    version, internal, gauss_next = rng_state
    return [version, list(internal), gauss_next]


def _python_rng_from_json(data: list[Any]) -> tuple:
    version, internal, gauss_next = data
    return (version, tuple(internal), gauss_next)


# ---------------------------------------------------------------------- small helpers


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _float_to_json(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else str(value)  # "nan", "inf", "-inf": JSON has none


def _float_from_json(value: Any) -> float:
    return float(value)


__all__ = [
    "ADAPTER_DIR",
    "LAST_CHECKPOINT_NAME",
    "STATE_JSON_NAME",
    "STATE_TENSORS_NAME",
    "TrainState",
    "load_checkpoint",
    "save_checkpoint",
]
