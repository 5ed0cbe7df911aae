"""Property-based battery: hostile data files, configs, adapter and checkpoint folders.

Whatever the bytes, cpt answers with one ValueError or a correct load, never another exception.
"""

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from contexts import context_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load
from tiny_models import make_model

from cpt import CPTConfig, CPTModel
from cpt.adapter import CPT_CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from cpt.checkpoint import STATE_JSON_NAME, TrainState, load_checkpoint, save_checkpoint
from cpt.datasets import load_dataset
from cpt.train import TrainConfig, make_optimizer

# Fixed examples in CI (derandomize); CPT_FUZZ_EXAMPLES=500 for a longer hunt.
FUZZ = settings(
    max_examples=int(os.environ.get("CPT_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=os.environ.get("CPT_FUZZ_EXAMPLES") is None,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _load_or_value_error(call):
    """``call()``'s result, or None if it raised ValueError; any other exception fails the test."""
    try:
        return call()
    except ValueError:
        return None


# ---------------------------------------------------------------------- data files


@FUZZ
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".jsonl"]))
def test_any_bytes_as_a_data_file(content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"d{suffix}"
        path.write_bytes(content)
        data = _load_or_value_error(lambda: load_dataset(path))
        if data is not None:
            assert data.examples and all(isinstance(e.text, str) and e.label for e in data.examples)


cells = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6)


@FUZZ
@given(
    header=st.lists(st.sampled_from(["text", "label", "id", "note"]), min_size=1, max_size=4),
    rows=st.lists(st.lists(cells, min_size=1, max_size=5), max_size=5),
)
def test_csv_loads_exactly_or_names_the_problem(header: list[str], rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in [header, *rows]:
        writer.writerow(row)
    blank = [r for r in rows if r == [""]]  # csv writes [""] as "", read back as a blank row
    real = [r for r in rows if r != [""]]
    sound = (
        header.count("text") == 1
        and header.count("label") == 1
        and all(len(r) == len(header) for r in real)
        and all(r[header.index("label")] for r in real)
        and real
        and not blank
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.csv"
        path.write_text(buffer.getvalue(), encoding="utf-8")
        data = _load_or_value_error(lambda: load_dataset(path))
    if sound:
        assert data is not None
        assert [(e.text, e.label) for e in data.examples] == [
            (r[header.index("text")], r[header.index("label")]) for r in real
        ]
    elif not blank:
        assert data is None


@FUZZ
@given(records=st.lists(st.dictionaries(st.sampled_from(["text", "label", "x"]), json_values, max_size=3), max_size=4))
def test_jsonl_records(records: list[dict]) -> None:
    content = "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.jsonl"
        path.write_text(content, encoding="utf-8")
        data = _load_or_value_error(lambda: load_dataset(path))
    if data is not None:
        assert [e.text for e in data.examples] == [r["text"] for r in records]


# ---------------------------------------------------------------------- configs


config_fields = st.sampled_from(
    ["cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask", "opt_weighted_loss_type", "opt_loss_decay_factor",
     "opt_projection_epsilon", "opt_projection_format_epsilon", "tokenizer_name_or_path", "task_type",
     "num_virtual_tokens", "peft_type"]
)


@FUZZ
@given(data=st.dictionaries(config_fields, json_values | st.lists(st.integers(-3, 12), max_size=6), max_size=6))
def test_config_from_any_dict(data: dict) -> None:
    config = _load_or_value_error(lambda: CPTConfig.from_dict(data))
    if config is not None:
        assert CPTConfig.from_dict(config.to_dict()) == config
        assert all(isinstance(i, int) for i in config.cpt_token_ids)


@FUZZ
@given(text=st.text(max_size=40) | json_values.map(json.dumps))
def test_config_from_any_json_text(text: str) -> None:
    _load_or_value_error(lambda: CPTConfig.from_json(text))


# ---------------------------------------------------------------------- adapter folders


@pytest.fixture(scope="module")
def trained() -> CPTModel:
    model = CPTModel(make_model("llama"), context_config())
    with torch.no_grad():
        model.delta.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    model.project_()
    model.task = {"template": {"input_template": "in: {}"}, "labels": ["pos", "neg"]}
    return model


@pytest.fixture(scope="module")
def saved(trained: CPTModel, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    trained.save_pretrained(root / "cpt")
    trained.save_pretrained(root / "peft", format="peft")
    return {"cpt": root / "cpt", "peft": root / "peft"}


def _corrupt(folder: Path, choice: int, position: int, value: int, mode: str) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    path = files[choice % len(files)]
    raw = bytearray(path.read_bytes())
    at = position % max(len(raw), 1)
    if mode == "flip" and raw:
        raw[at] ^= value or 1
    elif mode == "truncate":
        raw = raw[:at]
    elif mode == "extend":
        raw += bytes([value]) * 4
    else:
        path.unlink()
        return
    path.write_bytes(bytes(raw))


corruption = dict(
    choice=st.integers(0, 10),
    position=st.integers(0, 10**6),
    value=st.integers(0, 255),
    mode=st.sampled_from(["flip", "truncate", "extend", "delete"]),
)


@FUZZ
@given(layout=st.sampled_from(["cpt", "peft"]), **corruption)
def test_corrupted_adapter_bytes(trained, saved, layout: str, choice: int, position: int, value: int, mode: str) -> None:
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "a"
        shutil.copytree(saved[layout], folder)
        _corrupt(folder, choice, position, value, mode)
        loaded = _load_or_value_error(lambda: CPTModel.from_pretrained(trained.base_model, folder))
        if loaded is None:
            return
        if layout == "cpt":  # checksummed: the weights are the saved ones
            assert torch.equal(loaded.base, trained.base) and torch.equal(loaded.delta, trained.delta)
        else:  # no checksum in PEFT's layout: the weights are what the file holds, checked
            weights = safetensors_load((folder / PEFT_WEIGHTS_NAME).read_bytes())["prompt_embeddings"]
            assert torch.equal(loaded.base, weights) and bool(torch.isfinite(loaded.base).all())


@FUZZ
@given(layout=st.sampled_from(["cpt", "peft"]), path=st.lists(st.integers(0, 40), min_size=1, max_size=2), value=json_values)
def test_adapter_config_fields_of_any_value(trained, saved, layout: str, path: list[int], value) -> None:
    name = CPT_CONFIG_NAME if layout == "cpt" else PEFT_CONFIG_NAME
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "a"
        shutil.copytree(saved[layout], folder)
        data = json.loads((folder / name).read_text())
        keys = sorted(data) + ["config", "task"]
        holder, key = data, keys[path[0] % len(keys)]
        if len(path) > 1 and isinstance(data.get(key), dict) and data[key]:
            holder, key = data[key], sorted(data[key])[path[1] % len(data[key])]
        holder[key] = value
        (folder / name).write_text(json.dumps(data))
        loaded = _load_or_value_error(lambda: CPTModel.from_pretrained(trained.base_model, folder))
        if loaded is not None:
            assert bool(torch.isfinite(loaded.context_embeddings()).all())
            assert loaded.task is None or isinstance(loaded.task, dict)


# ---------------------------------------------------------------------- checkpoint folders

CONFIG = TrainConfig(batch_size=1, progress=False)


@pytest.fixture(scope="module")
def checkpoint(trained: CPTModel, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "last"
    optimizer = make_optimizer(trained, CONFIG)
    for _ in range(4):  # moments to save, one step per step of the state below
        trained.delta.grad = torch.ones_like(trained.delta)
        optimizer.step()
        trained.project_()
    trained.delta.grad = None
    state = TrainState(step=4, epoch=1, position=1, losses=[1.0, 0.9, 0.8, 0.7], eval_history=[{"step": 2, "acc": 0.5}])
    save_checkpoint(folder, trained, optimizer, state, CONFIG, num_samples=3)
    return folder


def _resume(trained: CPTModel, folder: Path):
    fresh = CPTModel(trained.base_model, trained.config)
    state = load_checkpoint(folder, fresh, make_optimizer(fresh, CONFIG), config=CONFIG, num_samples=3)
    return state, fresh


@FUZZ
@given(**corruption)
def test_corrupted_checkpoint_bytes(trained, checkpoint, choice: int, position: int, value: int, mode: str) -> None:
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "last"
        shutil.copytree(checkpoint, folder)
        _corrupt(folder, choice, position, value, mode)
        loaded = _load_or_value_error(lambda: _resume(trained, folder))
        if loaded is not None:  # every file is checksummed: a load is the saved state
            state, model = loaded
            assert (state.step, state.epoch, state.position) == (4, 1, 1)
            assert torch.equal(model.delta, trained.delta)


@FUZZ
@given(key=st.sampled_from(["step", "epoch", "position", "num_samples", "losses", "eval_history", "config",
                            "optimizer", "python_rng", "files_sha256", "format_version", "format"]),
       value=json_values, resign=st.booleans())
def test_checkpoint_state_fields_of_any_value(trained, checkpoint, key: str, value, resign: bool) -> None:
    from cpt import _io
    from cpt.checkpoint import _sha256

    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "last"
        shutil.copytree(checkpoint, folder)
        meta = json.loads((folder / STATE_JSON_NAME).read_text())
        meta[key] = value
        if resign:  # a hostile editor who also fixes the state's own checksum
            meta.pop("state_sha256")
            meta["state_sha256"] = _sha256(_io.json_bytes(meta)) if _finite_json(meta) else "0"
        (folder / STATE_JSON_NAME).write_text(json.dumps(meta))
        loaded = _load_or_value_error(lambda: _resume(trained, folder))
        if loaded is not None:
            state, model = loaded
            assert state.step == len(state.losses) and bool(torch.isfinite(model.delta).all())


def _finite_json(data) -> bool:
    try:
        json.dumps(data, allow_nan=False)
    except ValueError:
        return False
    return True
