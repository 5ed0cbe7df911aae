"""Resumable training state: one folder, written as a whole, read back only after checking it all.

Layout::

    adapter/                    the adapter in cpt's layout (`cpt.adapter.write_adapter`)
    trainer_state.safetensors   optimizer tensors (``optimizer.<param>.<name>``), RNG states
                                (``rng.torch``, ``rng.cuda.<i>``) and the best context kept so far
                                (``selection.best_delta``, with a selection)
    trainer_state.json          step, epoch, position, config, losses, evaluations, the selection's
                                state, the fingerprint of the context and training samples,
                                optimizer param groups and scalars, Python RNG state, the SHA-256
                                of every other file, and its own (``state_sha256``)

No pickle: safetensors for tensors, JSON for the rest. `save_checkpoint` replaces the folder as a
whole (`cpt._io.write_folder`: a crash or a reader sees the previous checkpoint or the new one,
and two runs saving into one folder take turns under a lock). `load_checkpoint` checks every field
and its range, every file's checksum, the optimizer state against what the optimizer itself keeps,
the RNG states against fresh generators, and the fit to the model, the config and the data before
it changes the model, the optimizer, an RNG or the selection.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from cpt import _io
from cpt._fields import MAX_SEED, is_finite, show
from cpt.adapter import (
    CPT_CONFIG_NAME,
    CPT_WEIGHTS_NAME,
    MAX_CONFIG_BYTES,
    SAFETENSORS_HEADER_BYTES,
    read_adapter_folder,
    weights_limit,
    write_adapter,
)
from cpt.data import epoch_steps
from cpt.schema import (
    ANY, BOOL, NULL, SHA256_HEX, Built, Choice, Either, Int, Items, Kind, Nullable, Number, Record, Text, Tuple,
    check_header, validate,
)

if TYPE_CHECKING:
    from cpt.model import CPTModel

STATE_FORMAT = "cpt-trainer-state"
CHECKPOINT_FORMAT_VERSION = 3  # 3: selection state, data fingerprint; 2: checksums of every file
_OLDER_FORMATS_LACK = {1: "checksums of every file", 2: "the selection state and the data fingerprint"}
ADAPTER_DIR = "adapter"  # the adapter, in cpt's layout (base and delta apart)
STATE_TENSORS_NAME = "trainer_state.safetensors"  # optimizer moments, RNG states
STATE_JSON_NAME = "trainer_state.json"  # step, epoch, ..., and the checksums of the other files
LAST_CHECKPOINT_NAME = "last"  # `train` keeps one rolling checkpoint, checkpoint_dir / "last"
CHECKSUMMED_FILES = (f"{ADAPTER_DIR}/{CPT_CONFIG_NAME}", f"{ADAPTER_DIR}/{CPT_WEIGHTS_NAME}", STATE_TENSORS_NAME)

ORDER_FIELDS = ("seed", "batch_size", "gradient_accumulation_steps")
"""TrainConfig fields that decide which samples each step sees: a resume must keep them."""
UPDATE_FIELDS = ("learning_rate", "weight_decay", "max_grad_norm")
"""TrainConfig fields that decide each step's update from its gradient: a resume must keep them
too, or its adapter would be neither run's. (``max_steps``, ``epochs`` may change: a longer run.)"""
_KEPT_FIELDS = {**dict.fromkeys(ORDER_FIELDS, "the sample order"), **dict.fromkeys(UPDATE_FIELDS, "the updates")}

MAX_STATE_JSON_BYTES = 256 * 2**20
"""The largest trainer_state.json read: steps' losses and evaluations, far more than a run writes."""
OPTIMIZER_TENSORS = 4  # per-parameter tensors a trainer state may hold: AdamW keeps 2, 3 with amsgrad
MOMENT_BYTES = torch.float64.itemsize  # the widest entry an optimizer moment may hold
RNG_STATE_BYTES = 2**20  # the RNG states of the CPU and every GPU: a few KiB each
_MT_STATE_LENGTH = 625  # Python's Mersenne Twister: 624 words and an index
_MT_WORD = Int(0, 2**32 - 1)  # one of its 32-bit words
SELECTION_TENSOR = "selection.best_delta"
FINGERPRINT_PARTS = ("context", "samples")
_FINGERPRINT_WHAT = ("a different context", "different training samples (token ids or type codes)")
_CONTEXT_FIELDS = ("cpt_token_ids", "cpt_tokens_type_mask", "cpt_mask")  # what the context trains on
_NON_NEGATIVE_MOMENTS = ("step", "exp_avg_sq", "max_exp_avg_sq")  # Adam's step count, second moments
_NON_FINITE = ("nan", "inf", "-inf")  # how `_float_to_json` writes what JSON has no number for

FLOAT = Either(Number(), Choice(*_NON_FINITE))
"""A float that may be non-finite: a number, or one of the strings `_float_to_json` writes."""

PROGRESS_SCHEMA = {
    "step": Int(min=0),
    "epoch": Int(min=0),
    "position": Int(min=0),
    "num_samples": Int(min=1),
    "fingerprint": Nullable(Record(dict.fromkeys(FINGERPRINT_PARTS, SHA256_HEX))),
    "losses": Items(Number()),
    "eval_history": Items(Record({"step": Int(min=1)}, extra=FLOAT)),  # {"step": s, metric: value, ...}
    "selection": Nullable(Record({"calls": Int(min=0), "best_call": Nullable(Int(min=0)), "best_score": FLOAT})),
    "config": Record(
        {
            "seed": Int(0, MAX_SEED),
            **dict.fromkeys(ORDER_FIELDS[1:], Int(min=1)),
            "learning_rate": Number(min=0),
            "weight_decay": Number(min=0),
            "max_grad_norm": Nullable(Number(min=0)),
        },
        extra=ANY,  # the rest is TrainConfig's to check, on a resume with a config
    ),
}
"""Where a run stands (`TrainState`), and what it ran with: checked before a save and after a load."""

STATE_SCHEMA = Record(
    {
        "format": Choice(STATE_FORMAT),
        "format_version": Int(min=1),
        **PROGRESS_SCHEMA,
        "optimizer": Record({"state": Record({}, extra=Record({}, extra=ANY)), "param_groups": Items(Record({}, extra=ANY))}),
        "python_rng": Tuple(Int(), Tuple(*[_MT_WORD] * (_MT_STATE_LENGTH - 1), Int(0, _MT_STATE_LENGTH - 1)), Nullable(Number())),
        "files_sha256": Record(dict.fromkeys(CHECKSUMMED_FILES, SHA256_HEX)),
        "state_sha256": SHA256_HEX,
    }
)
"""trainer_state.json. The optimizer's part is checked in full against the optimizer it is loaded
into (`_optimizer_schema`), the order of steps and evaluations by `_check_progress`."""


@dataclass
class Selection:
    """The best context an evaluation kept so far (`cpt.selection.LeaveOneOut`): part of what a
    run returns, so a checkpoint carries it.

    Attributes:
        calls: evaluations so far.
        best_call: which of them scored best (0-based); None while none scored above -inf.
        best_score: its score.
        best_delta: its ``delta``, (N, d); None with ``best_call``.
    """

    calls: int = 0
    best_call: int | None = None
    best_score: float = -math.inf
    best_delta: torch.Tensor | None = None


@dataclass
class TrainState:
    """Where a run stands between two optimizer steps: everything a resume needs but tensors.

    Attributes:
        step: optimizer steps done.
        epoch: the epoch the next batch belongs to.
        position: batches of that epoch already consumed.
        losses: per-step losses so far (one per step).
        eval_history: evaluations so far, each ``{"step": s, name: value, ...}``.
        selection: the selection's state, if the run keeps one.
    """

    step: int = 0
    epoch: int = 0
    position: int = 0
    losses: list[float] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    selection: Selection | None = None


def fingerprint(context: Any, dataset: Sequence[Any]) -> dict[str, str]:
    """SHA-256 digests of what a run trains on, for a resume to compare.

    Args:
        context: the model's `CPTConfig` (its token ids, type codes and mask are hashed).
        dataset: the training samples, in order: mappings such as `cpt.data.CPTDataset`'s
            (``input_ids``, ``input_type_mask``); every key and value is hashed.

    Returns:
        ``{"context": hex digest, "samples": hex digest}``.

    Raises:
        ValueError: if a sample holds something other than numbers, strings, lists, mappings
            and tensors (naming its index).
    """
    samples = hashlib.sha256()
    for i in range(len(dataset)):
        samples.update(_sample_bytes(dataset[i], i))
    context_fields = {name: getattr(context, name) for name in _CONTEXT_FIELDS}
    return {"context": _sha256(_io.json_bytes(context_fields)), "samples": samples.hexdigest()}


def save_checkpoint(
    folder: str | Path,
    model: CPTModel,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config: Any,
    *,
    num_samples: int,
    fingerprint: Mapping[str, str] | None = None,
) -> Path:
    """Writes a resumable training state into ``folder``, replacing it as a whole.

    The folder is built under a temporary sibling and swapped in whole (`cpt._io.write_folder`):
    a crash while saving leaves the previous checkpoint, a concurrent reader sees one of the two,
    and two runs saving into one folder take turns instead of deleting each other's folders.

    Args:
        folder: the checkpoint folder to create or replace.
        model: the model being trained (saved as it is: delta is projected after every step).
        optimizer: its optimizer (`cpt.train.make_optimizer`).
        state: where the run stands, the selection's state included.
        config: the run's `cpt.train.TrainConfig` (recorded, and checked on resume).
        num_samples: the dataset's length (checked on resume).
        fingerprint: the data's `fingerprint` (checked on resume).

    Returns:
        The folder.

    Raises:
        ValueError: if ``state`` does not fit ``config`` and ``num_samples``, the optimizer's state
            is not that of ``state.step`` steps, the weights are not finite, or ``folder`` is a
            file.
    """
    folder = Path(folder)
    config_dict = config.to_dict()
    state_json = _state_json(state, num_samples, fingerprint)
    _check_progress(folder / STATE_JSON_NAME, {**state_json, "config": config_dict})
    tensors, optimizer_json = _optimizer_to_tensors(optimizer)
    # what a resume would refuse is not written: the optimizer's state must be that of the steps
    as_read = json.loads(_io.json_bytes(optimizer_json))  # what a resume reads: tuples become lists
    _optimizer_from_tensors({**state_json, "optimizer": as_read}, tensors, optimizer, folder, set())
    tensors.update(_rng_tensors())
    if state.selection is not None and state.selection.best_delta is not None:
        tensors[SELECTION_TENSOR] = state.selection.best_delta
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
            **state_json,
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
    fingerprint: Mapping[str, str] | None = None,
    selection: bool | None = None,
) -> TrainState:
    """Restores a checkpoint into ``model``, ``optimizer`` and the global RNGs.

    Everything is read and checked first; nothing changes unless all of it is sound. The
    optimizer's moments and step counts come from the checkpoint; its hyper-parameters (learning
    rate, weight decay) stay those it was built with, i.e. the current config's.

    Args:
        folder: a folder written by `save_checkpoint`.
        model: a model with the same context and base model as the one saved.
        optimizer: a fresh optimizer over ``model.trainable_parameters()``.
        config: if given, the saved config must be a valid one of its class, and its ``seed``,
            ``batch_size`` and ``gradient_accumulation_steps`` must equal the saved ones (they
            decide the sample order).
        num_samples: if given, must equal the saved dataset length.
        fingerprint: if given, must equal the saved `fingerprint` (the same context and samples).
        selection: if given, whether this run keeps a selection state: the checkpoint must hold
            one exactly then.

    Returns:
        The `TrainState` to continue from, the selection's state included.

    Raises:
        ValueError: one problem, naming the folder or file, the field and the value: a missing
            or incomplete checkpoint, a file whose checksum differs, a field of the wrong type or
            out of range, an optimizer or RNG state its optimizer or generator would not take, or
            a mismatch with the model, the config, the data or the selection.
    """
    weights = model.base_model.get_input_embeddings().weight
    limits = _file_limits(int(model.delta.shape[0]), int(weights.shape[1]))
    meta, tensors, adapter = _io.open_folder(
        folder,
        lambda f: _read_checkpoint(f, int(weights.shape[1]), int(weights.shape[0]), limits),
        "checkpoint",
    )
    tensors_where = Path(folder) / STATE_TENSORS_NAME
    _check_adapter_matches(Path(folder) / ADAPTER_DIR, adapter, model)
    _check_fits_the_run(Path(folder), meta, config, num_samples, fingerprint, selection)
    used = {k for k in tensors if k.startswith("rng.")}
    optimizer_state = _optimizer_from_tensors(meta, tensors, optimizer, Path(folder), used)
    restored = _selection_from_json(meta["selection"], tensors, model.delta, tensors_where, used)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"{tensors_where} has unexpected tensors {unexpected}")

    # everything is checked: from here on nothing refuses
    optimizer.load_state_dict(optimizer_state)
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
        selection=restored,
    )


# ---------------------------------------------------------------------- reading and checking


def _file_limits(rows: int, hidden_size: int) -> dict[str, int]:
    """The most bytes each checksummed file may hold for a context of ``rows`` x ``hidden_size``:
    checked before a file is read, so a huge one is refused instead of exhausting memory."""
    state = OPTIMIZER_TENSORS * rows * hidden_size * MOMENT_BYTES + RNG_STATE_BYTES + SAFETENSORS_HEADER_BYTES
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
            f"{folder.path} was written by an older cpt (format {version}, without "
            f"{_OLDER_FORMATS_LACK[version]}): it cannot be resumed exactly, start a fresh run"
        )
    recorded = meta.get("state_sha256")
    body = {k: v for k, v in meta.items() if k != "state_sha256"}
    if not isinstance(recorded, str) or _sha256(_io.json_bytes(body)) != recorded:
        raise ValueError(
            f"{where}: field 'state_sha256' is {show(recorded)}, which is not the checksum of the file's "
            "other fields: the file was changed or damaged"
        )
    validate(meta, STATE_SCHEMA, where)
    _check_progress(where, meta)
    checksums = meta["files_sha256"]
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
    # embeddings are compared exactly afterwards (`_check_adapter_matches`), not within rounding
    adapter = read_adapter_folder(folder.folder(ADAPTER_DIR), hidden_size, vocab_size, None)
    tensors_path = folder.path / STATE_TENSORS_NAME
    try:
        tensors = safetensors_load(contents[STATE_TENSORS_NAME])
    except (SafetensorError, ValueError, RuntimeError, OverflowError, MemoryError) as error:
        raise ValueError(f"{tensors_path} is not a valid safetensors file: {error}") from None
    _check_rng(tensors, meta["python_rng"], tensors_path, where)
    return meta, tensors, adapter


def _state_json(state: TrainState, num_samples: int, fingerprint: Mapping[str, str] | None) -> dict[str, Any]:
    selection = state.selection
    return {
        "step": state.step,
        "epoch": state.epoch,
        "position": state.position,
        "num_samples": num_samples,
        "fingerprint": None if fingerprint is None else dict(fingerprint),
        "losses": list(state.losses),
        "eval_history": [
            {k: (v if k == "step" else _float_to_json(v)) for k, v in entry.items()} for entry in state.eval_history
        ],
        "selection": None if selection is None else {
            "calls": selection.calls,
            "best_call": selection.best_call,
            "best_score": _float_to_json(selection.best_score),
        },
    }


def _check_progress(where: Path, meta: Mapping[str, Any]) -> None:
    """Checks the fields of `PROGRESS_SCHEMA`, and that they agree: the step is the epoch's and
    position's, one loss a step, evaluations in order up to the step, and a selection that scored
    at each evaluation and at most once before (`cpt.workflow.fit` scores the untrained context)."""
    validate({k: meta.get(k) for k in PROGRESS_SCHEMA}, Record(PROGRESS_SCHEMA), where)
    config, step, epoch, position = meta["config"], meta["step"], meta["epoch"], meta["position"]
    accumulation = config["gradient_accumulation_steps"]
    batches, steps_per_epoch = epoch_steps(meta["num_samples"], config["batch_size"], accumulation)
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
    if len(meta["losses"]) != step:
        raise ValueError(f"{where}: field 'losses' holds {len(meta['losses'])} losses, but the run took {step} steps")
    steps = [entry["step"] for entry in meta["eval_history"]]
    for i, (before, at) in enumerate(zip([0, *steps], steps)):
        if not before < at <= step:
            raise ValueError(f"{where}: field 'eval_history[{i}].step' must be in {before + 1}..{step}, got {at}")
    selection = meta["selection"]
    if selection is None:
        return
    calls, best_call, score = selection["calls"], selection["best_call"], selection["best_score"]
    if not len(steps) <= calls <= len(steps) + 1:
        raise ValueError(
            f"{where}: field 'selection.calls' must be {len(steps)} or {len(steps) + 1} (one per evaluation, "
            f"and one before training), got {calls}"
        )
    if best_call is not None and best_call >= calls:
        raise ValueError(f"{where}: field 'selection.best_call' must be null or in 0..{calls - 1}, got {best_call}")
    if not (score == "-inf" if best_call is None else is_finite(score)):
        wanted = '"-inf" (nothing kept yet)' if best_call is None else "a finite number"
        raise ValueError(f"{where}: field 'selection.best_score' must be {wanted}, got {show(score)}")


def _check_fits_the_run(
    folder: Path,
    meta: dict[str, Any],
    config: Any,
    num_samples: int | None,
    fingerprint: Mapping[str, str] | None,
    selection: bool | None,
) -> None:
    """Checks the checkpoint belongs to this run: its config, data and selection."""
    if config is not None:
        shape = Record(dict.fromkeys(config.to_dict(), ANY))  # every field of its class, no other
        validate(meta["config"], Built(lambda saved: type(config)(**saved), shape), folder / STATE_JSON_NAME, "config")
        for name, what in _KEPT_FIELDS.items():
            if meta["config"][name] != getattr(config, name):
                raise ValueError(
                    f"cannot resume from {folder}: it was trained with {name}={meta['config'][name]!r}, "
                    f"the config has {name}={getattr(config, name)!r} ({what} would differ)"
                )
    if num_samples is not None and meta["num_samples"] != num_samples:
        raise ValueError(
            f"cannot resume from {folder}: it was trained on {meta['num_samples']} samples, "
            f"the dataset has {num_samples}"
        )
    if fingerprint is not None:
        saved = meta["fingerprint"]
        if saved is None:
            raise ValueError(f"cannot resume from {folder}: it records no fingerprint of its data to compare")
        for part, what in zip(FINGERPRINT_PARTS, _FINGERPRINT_WHAT, strict=True):
            if saved[part] != fingerprint[part]:
                raise ValueError(
                    f"cannot resume from {folder}: it was trained on {what} "
                    f"(SHA-256 {saved[part][:12]}..., this run's {fingerprint[part][:12]}...)"
                )
    if selection is not None and selection != (meta["selection"] is not None):
        had = "kept a selection state" if meta["selection"] is not None else "kept no selection state"
        raise ValueError(
            f"cannot resume from {folder}: its run {had}, this one {'does' if selection else 'does not'} "
            "(a different selection option?)"
        )


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
    """Every RNG state is one its generator takes: each is tried on a fresh generator, so a bad
    one is refused before any global RNG changes."""
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    expected = ["rng.torch", *(f"rng.cuda.{i}" for i in range(len(cuda)))]
    if sorted(k for k in tensors if k.startswith("rng.")) != sorted(expected):
        got = sorted(k for k in tensors if k.startswith("rng."))
        raise ValueError(f"{tensors_path}: the RNG tensors must be 'rng.torch' and 'rng.cuda.0..n-1', got {got}")
    for key in expected:
        tensor = tensors[key]
        if tensor.dtype != torch.uint8 or tensor.dim() != 1:
            got = f"{tensor.dtype} {tuple(tensor.shape)}"
            raise ValueError(f"{tensors_path}: tensor {key!r} must be a 1-D uint8 tensor, got {got}")
        device = "cpu" if key == "rng.torch" else f"cuda:{key.rpartition('.')[2]}"
        if device != "cpu" and not (torch.cuda.is_available() and int(device[5:]) < torch.cuda.device_count()):
            continue  # restored only where that GPU exists (`_restore_rng`)
        try:
            torch.Generator(device=device).set_state(tensor)
        except (RuntimeError, ValueError, TypeError) as error:
            message = " ".join(str(error).split())
            raise ValueError(f"{tensors_path}: tensor {key!r} is not a {device} RNG state: {message}") from None
    try:
        random.Random().setstate(_python_rng_from_json(python_rng))
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"{where}: field 'python_rng' is not a Python random state: {show(python_rng)}") from None


# ---------------------------------------------------------------------- optimizer, selection and RNG


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
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    folder: Path,
    used: set[str],
) -> dict[str, Any]:
    """Rebuilds ``optimizer.state_dict()`` from `_optimizer_to_tensors`' two parts, checked
    against what ``optimizer`` itself keeps after a step (`_state_after_a_step`): the same
    parameters, the same entries, each of the same kind, dtype and shape, finite, step counts
    equal to the run's steps, second moments >= 0. The param groups are this optimizer's own
    (the current config's hyper-parameters); the saved ones must have its keys and kinds.
    Adds the tensors it reads to ``used``."""
    current = optimizer.state_dict()["param_groups"]
    expected = _state_after_a_step(optimizer) if meta["step"] > 0 else {}
    validate(meta["optimizer"], _optimizer_schema(expected, current), folder / STATE_JSON_NAME, "optimizer")
    saved = meta["optimizer"]["state"]
    state = {
        param_id: {
            name: _optimizer_entry(
                folder, f"optimizer.state.{param_id}.{name}", saved[str(param_id)][name], want, tensors, meta["step"], used
            )
            for name, want in reference.items()
        }
        for param_id, reference in expected.items()
    }
    return {"state": state, "param_groups": current}


def _optimizer_schema(expected: Mapping[int, Mapping[str, Any]], groups: list[dict[str, Any]]) -> Record:
    """What trainer_state.json's ``optimizer`` must be for an optimizer that keeps ``expected``
    once it has stepped and has the param ``groups``: per parameter the same entries, a tensor's
    as ``{"tensor": key}`` and a scalar's as ``{"value": v}`` of the same kind; param groups with
    the same keys, parameters and kinds of values (hyper-parameters >= 0, betas below 1)."""
    tensor = Record({"tensor": Text()})
    state = {
        str(param_id): Record(
            {name: tensor if isinstance(want, torch.Tensor) else Record({"value": _kind_like(want)}) for name, want in entry.items()}
        )
        for param_id, entry in expected.items()
    }
    saved_groups = [
        Record({k: _kind_like(v, below_one=k == "betas", exact=k == "params") for k, v in group.items()})
        for group in groups
    ]
    return Record({"state": Record(state), "param_groups": Tuple(*saved_groups)})


def _kind_like(value: Any, below_one: bool = False, exact: bool = False) -> Kind:
    """The kind of a JSON value that can stand where ``value`` (a hyper-parameter or optimizer
    scalar) stands: a bool, None, a string, a number >= 0 (< 1 if ``below_one``; ``value`` itself
    if ``exact``, as a parameter's index), or a list of as many."""
    if isinstance(value, (list, tuple)):
        return Tuple(*(_kind_like(v, below_one, exact) for v in value))
    if exact:
        return Choice(value)
    if isinstance(value, bool):
        return BOOL
    if value is None or isinstance(value, str):
        return NULL if value is None else Text()
    if isinstance(value, (int, float)):
        return Number(min=0, below=1 if below_one else None)
    return Choice()  # nothing a JSON file holds


def _optimizer_entry(
    folder: Path, label: str, item: dict[str, Any], want: Any, tensors: dict[str, torch.Tensor],
    steps: int, used: set[str],
) -> Any:
    """One saved optimizer entry (its JSON checked), with its tensor checked against the value
    ``want`` a real step produced."""
    if not isinstance(want, torch.Tensor):
        return item["value"]
    name, key, tensors_where = label.rpartition(".")[2], item["tensor"], folder / STATE_TENSORS_NAME
    if key not in tensors:
        raise ValueError(f"{folder / STATE_JSON_NAME}: field {label!r} must name a saved tensor, got {show(item)}")
    tensor = tensors[key]
    if tensor.dtype != want.dtype or tuple(tensor.shape) != tuple(want.shape):
        raise ValueError(
            f"{tensors_where}: tensor {key!r} must be {want.dtype} of shape {tuple(want.shape)}, "
            f"got {tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    if not bool(torch.isfinite(tensor).all()) or (name in _NON_NEGATIVE_MOMENTS and bool((tensor < 0).any())):
        raise ValueError(f"{tensors_where}: tensor {key!r} holds a value out of range (non-finite or negative)")
    if name == "step" and tensor.numel() == 1 and float(tensor) != steps:
        raise ValueError(f"{tensors_where}: tensor {key!r} counts {float(tensor)} steps, the run took {steps}")
    used.add(key)
    return tensor


def _state_after_a_step(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    """What ``optimizer`` keeps per parameter once it has stepped: the state of a twin (same
    class and hyper-parameters, zero parameters of the same shapes, dtypes and devices) after
    one step on zero gradients. The reference for a saved state, whatever the optimizer."""
    groups = []
    for group in optimizer.param_groups:
        params = [torch.zeros_like(p, requires_grad=True) for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    twin = type(optimizer)(groups)
    for group in twin.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    twin.step()
    return twin.state_dict()["state"]


def _selection_from_json(
    value: Any, tensors: dict[str, torch.Tensor], delta: torch.Tensor, tensors_where: Path, used: set[str]
) -> Selection | None:
    """The saved selection state (its JSON already checked), with its best context: a tensor of
    ``delta``'s dtype and shape, finite, saved exactly when a context was kept."""
    if value is None:
        return None
    kept = value["best_call"] is not None
    if kept != (SELECTION_TENSOR in tensors):
        holds = "lacks" if kept else "has"
        raise ValueError(f"{tensors_where} {holds} tensor {SELECTION_TENSOR!r}, which the selection state contradicts")
    best_delta = None
    if kept:
        tensor = tensors[SELECTION_TENSOR]
        if tensor.dtype != delta.dtype or tensor.shape != delta.shape or not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{tensors_where}: tensor {SELECTION_TENSOR!r} must be finite {delta.dtype} of shape "
                f"{tuple(delta.shape)}, got {tensor.dtype} of shape {tuple(tensor.shape)}"
            )
        used.add(SELECTION_TENSOR)
        best_delta = tensor.to(delta.device)
    return Selection(value["calls"], value["best_call"], _float_from_json(value["best_score"]), best_delta)


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


def _sample_bytes(sample: Any, index: int) -> bytes:
    """One training sample as compact JSON, one line (lists of numbers go straight through)."""
    def text(value: Any) -> str:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)

    try:
        return (text(sample) + "\n").encode()
    except (TypeError, ValueError):  # tensors, arrays; or NaN, which _plain names
        return (text(_plain(sample, f"training sample {index}")) + "\n").encode()


def _plain(value: Any, what: str) -> Any:
    """``value`` as JSON data (tensors and arrays as nested lists), for a fingerprint."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, what) for v in value]
    if value is None or isinstance(value, (str, int)) or is_finite(value):
        return value
    raise ValueError(f"cannot fingerprint {what} for a checkpoint: it holds {show(value)}")


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
    "Selection",
    "TrainState",
    "fingerprint",
    "load_checkpoint",
    "save_checkpoint",
]
