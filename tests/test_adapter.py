import hashlib
import json
import os
import stat

import pytest
import torch
from contexts import context_config, sample_batch
from safetensors.torch import load_file, save_file
from tiny_models import make_model

from cpt import CPTModel, _io, adapter_format
from cpt.adapter import (
    CPT_CONFIG_NAME,
    CPT_WEIGHTS_NAME,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    save_adapter,
    weights_limit,
)


@pytest.fixture
def trained() -> CPTModel:
    model = CPTModel(make_model("llama"), context_config(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.9))
    with torch.no_grad():
        model.delta.normal_(0, 0.05)
    model.project_()
    return model


def test_cpt_layout_keeps_base_and_delta_apart(trained: CPTModel, tmp_path) -> None:
    trained.save_pretrained(tmp_path)
    assert adapter_format(tmp_path) == "cpt"
    tensors = load_file(tmp_path / CPT_WEIGHTS_NAME)
    assert set(tensors) == {"base", "delta"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    loaded = CPTModel.from_pretrained(make_model("llama"), tmp_path)
    assert torch.equal(loaded.base, trained.base) and torch.equal(loaded.delta, trained.delta)
    assert loaded.config == trained.config
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_peft_layout_holds_one_prompt_embeddings_tensor(trained: CPTModel, tmp_path) -> None:
    trained.save_pretrained(tmp_path, format="peft")
    assert adapter_format(tmp_path) == "peft"
    tensors = load_file(tmp_path / PEFT_WEIGHTS_NAME)
    assert list(tensors) == ["prompt_embeddings"]
    assert torch.equal(tensors["prompt_embeddings"], trained.context_embeddings().detach())
    config = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    assert config["peft_type"] == "CPT" and config["task_type"] == "CAUSAL_LM"
    assert config["token_dim"] == 32 and config["num_virtual_tokens"] == trained.num_virtual_tokens


def test_save_projects_first(trained: CPTModel, tmp_path) -> None:
    with torch.no_grad():
        trained.delta.mul_(100.0)  # as after an optimizer step, before project_()
    trained.save_pretrained(tmp_path)
    delta = load_file(tmp_path / CPT_WEIGHTS_NAME)["delta"]
    assert torch.all(delta.norm(dim=1) <= trained.epsilon * (1 + 1e-5))


def test_resumed_training_from_cpt_layout_is_exact(trained: CPTModel, tmp_path) -> None:
    trained.save_pretrained(tmp_path)
    loaded = CPTModel.from_pretrained(make_model("llama"), tmp_path)
    batch = sample_batch(2)
    for model in (trained, loaded):
        model.delta.grad = None
        model(**batch).loss.backward()
    assert torch.equal(trained.delta.grad, loaded.delta.grad)


def test_missing_and_foreign_folders(tmp_path) -> None:
    with pytest.raises(ValueError, match="no adapter folder at"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no adapter"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.safetensors is a file, but adapters are saved as folders"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path / "weights.safetensors")


def test_mismatched_model_is_named(trained: CPTModel, tmp_path) -> None:
    trained.save_pretrained(tmp_path / "cpt")
    trained.save_pretrained(tmp_path / "peft", format="peft")
    import transformers

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4)
    other = transformers.LlamaForCausalLM(config)
    for fmt in ("cpt", "peft"):
        with pytest.raises(ValueError, match="for hidden size 32, but the model's is 64"):
            CPTModel.from_pretrained(other, tmp_path / fmt)
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="field 'vocab_size' is 96: the adapter is for vocabulary size 96, but the model's is 20"):
        CPTModel.from_pretrained(small, tmp_path / "cpt")
    with pytest.raises(ValueError, match="outside the model's vocabulary of 20"):
        CPTModel.from_pretrained(small, tmp_path / "peft")


def test_files_from_two_saves_are_detected(trained: CPTModel, tmp_path) -> None:
    trained.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        trained.delta.mul_(0.5)
    trained.save_pretrained(tmp_path / "b")
    (tmp_path / "a" / CPT_WEIGHTS_NAME).write_bytes((tmp_path / "b" / CPT_WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="checksum differs"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path / "a")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / CPT_CONFIG_NAME).write_text("{not json"), "cannot read adapter config"),
        (lambda d: (d / CPT_CONFIG_NAME).write_text("[1, 2]"), "does not hold a JSON object"),
        (lambda d: (d / CPT_WEIGHTS_NAME).unlink(), "adapter weights missing"),
    ],
)
def test_damaged_cpt_folders_are_named(trained: CPTModel, tmp_path, damage, message: str) -> None:
    trained.save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)


def test_damaged_peft_folders_are_named(trained: CPTModel, tmp_path) -> None:
    trained.save_pretrained(tmp_path, format="peft")
    (tmp_path / PEFT_WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)
    save_file({"other": torch.zeros(2, 2)}, tmp_path / PEFT_WEIGHTS_NAME)
    with pytest.raises(ValueError, match="has no tensor 'prompt_embeddings'"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)
    save_file({"prompt_embeddings": torch.zeros(3, 32)}, tmp_path / PEFT_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"has shape \(3, 32\), expected \(20, 32\)"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)
    config = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    config["peft_type"] = "LORA"
    (tmp_path / PEFT_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="field 'peft_type' must be \"CPT\", got 'LORA'"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)


def test_a_failed_write_leaves_the_previous_adapter(trained: CPTModel, tmp_path, monkeypatch) -> None:
    trained.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import cpt._io

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cpt._io.os, "fsync", explode)
    with torch.no_grad():
        trained.delta.mul_(0.5)
    with pytest.raises(OSError, match="disk full"):
        trained.save_pretrained(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no temporary file left, nothing half-written
    CPTModel.from_pretrained(make_model("llama"), tmp_path)


def test_saving_onto_a_file_is_refused(trained: CPTModel, tmp_path) -> None:
    target = tmp_path / "file"
    target.write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        trained.save_pretrained(target)
    assert target.read_text() == "mine"


# ---------------------------------------------------------------------- one writer, one reader


def _edit_json(name: str, change):
    def damage(folder):
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))

    return damage


def _edit_weights(name: str, change):
    def damage(folder):
        save_file(change(load_file(folder / name)), folder / name)
        if name == CPT_WEIGHTS_NAME:  # a forger who also fixes the checksum
            _edit_json(CPT_CONFIG_NAME, lambda c: c.update(
                weights_sha256=hashlib.sha256((folder / name).read_bytes()).hexdigest()))(folder)

    return damage


def _set(tensors: dict, key: str, row: int, value: float) -> dict:
    tensors[key][row, 0] = value
    return tensors


@pytest.mark.parametrize(
    ("layout", "damage", "message"),
    [
        ("cpt", _edit_weights(CPT_WEIGHTS_NAME, lambda t: _set(t, "base", 0, float("nan"))), r"tensor 'base' holds nan at row 0, column 0"),
        ("cpt", _edit_weights(CPT_WEIGHTS_NAME, lambda t: _set(t, "delta", 3, float("inf"))), r"tensor 'delta' holds inf at row 3"),
        ("peft", _edit_weights(PEFT_WEIGHTS_NAME, lambda t: _set(t, "prompt_embeddings", 1, float("-inf"))), r"holds -inf at row 1"),
        ("cpt", _edit_weights(CPT_WEIGHTS_NAME, lambda t: {k: v.half() for k, v in t.items()}), r"has dtype torch.float16, expected float32"),
        ("peft", _edit_weights(PEFT_WEIGHTS_NAME, lambda t: {k: v.double() for k, v in t.items()}), r"has dtype torch.float64, expected float32"),
        ("cpt", _edit_weights(CPT_WEIGHTS_NAME, lambda t: {**t, "extra": torch.zeros(1)}), r"has unexpected tensors \['extra'\]"),
        ("cpt", _edit_weights(CPT_WEIGHTS_NAME, lambda t: {**t, "delta": t["delta"] * 100}), r"tensor 'delta' row \d+ has norm .* outside its ball"),
        ("cpt", _edit_json(CPT_CONFIG_NAME, lambda c: c.update(task={"labels": "np"})), r"field 'task.labels' must be null or a non-empty list, got 'np'"),
        ("cpt", _edit_json(CPT_CONFIG_NAME, lambda c: c.update(task={"labels": ["a", "b", 3]})), r"cpt_config.json: field 'task.labels\[2\]' must be a non-empty string, got 3"),
        ("cpt", _edit_json(CPT_CONFIG_NAME, lambda c: c.update(task={"labels": ["a"], "x": 1})), r"field 'task' has unknown keys \['x'\]"),
        ("cpt", _edit_json(CPT_CONFIG_NAME, lambda c: c.update(task={"labels": ["a", "a"]})), r"field 'task.labels' holds 'a' twice"),
        ("cpt", _edit_json(CPT_CONFIG_NAME, lambda c: c.update(task={"template": {"input_template": "no slot"}})), r"field 'task.template'"),
        ("cpt", _edit_json(CPT_CONFIG_NAME, lambda c: c.update(format_version="1")), r"field 'format_version' must be an integer >= 1, got '1'"),
        ("cpt", _edit_json(CPT_CONFIG_NAME, lambda c: c.update(format_version=2)), r"written by a newer cpt \(format version 2\)"),
        ("cpt", _edit_json(CPT_CONFIG_NAME, lambda c: c.update(hidden_size=[32])), r"field 'hidden_size' must be an integer >= 1, got \[32\]"),
        ("cpt", _edit_json(CPT_CONFIG_NAME, lambda c: c.update(weights_sha256=None)), r"field 'weights_sha256' must be 64 hex digits, got None"),
        ("cpt", _edit_json(CPT_CONFIG_NAME, lambda c: c["config"].update(opt_projection_epsilon="x")), r"field 'config': opt_projection_epsilon must be"),
        ("cpt", _edit_json(CPT_CONFIG_NAME, lambda c: c.update(config=[1])), r"field 'config' must be an object, got \[1\]"),
        ("peft", _edit_json(PEFT_CONFIG_NAME, lambda c: c.update(token_dim="32")), r"field 'token_dim' must be an integer >= 1, got '32'"),
        ("peft", _edit_json(PEFT_CONFIG_NAME, lambda c: c.pop("peft_type")), r"field 'peft_type' is missing"),
        ("peft", _edit_json(PEFT_CONFIG_NAME, lambda c: c.update(peft_type="LORA")), r"field 'peft_type' must be \"CPT\", got 'LORA'"),
        ("cpt", lambda d: (d / CPT_CONFIG_NAME).write_text('{"format": NaN}'), r"NaN is not valid JSON"),
    ],
)
def test_hostile_adapter_folders_get_one_value_error(trained: CPTModel, tmp_path, layout, damage, message) -> None:
    trained.save_pretrained(tmp_path, format=layout)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)


@pytest.mark.parametrize("layout", ["cpt", "peft"])
def test_another_model_of_the_same_shape_is_refused(trained: CPTModel, tmp_path, layout: str) -> None:
    trained.save_pretrained(tmp_path, format=layout)
    with pytest.raises(ValueError, match=r"context embeddings do not match the model's: row 0 .* another model"):
        CPTModel.from_pretrained(make_model("llama", seed=1), tmp_path)  # same width and vocabulary
    # cpt's layout records the vocabulary size; PEFT's does not, its rows are compared instead
    with pytest.raises(ValueError, match="vocabulary size 96, but the model's is 128" if layout == "cpt" else "another model"):
        CPTModel.from_pretrained(make_model("llama", vocab_size=128), tmp_path)
    loaded = CPTModel.from_pretrained(make_model("llama").to(torch.bfloat16), tmp_path)  # same model, rounded
    assert torch.equal(loaded.context_embeddings(), trained.context_embeddings())


def test_saving_one_layout_removes_the_other(trained: CPTModel, tmp_path) -> None:
    (tmp_path / "README.md").write_text("notes")  # another tool's file stays
    trained.save_pretrained(tmp_path)
    with torch.no_grad():
        trained.delta.mul_(0.5)
    trained.save_pretrained(tmp_path, format="peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["README.md", PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME])
    loaded = CPTModel.from_pretrained(make_model("llama"), tmp_path)
    assert torch.equal(loaded.context_embeddings(), trained.context_embeddings())  # the newest, not a stale one
    trained.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["README.md", CPT_CONFIG_NAME, CPT_WEIGHTS_NAME])


def test_modes_and_no_leftovers(trained: CPTModel, tmp_path) -> None:
    old = os.umask(0o022)
    try:
        trained.save_pretrained(tmp_path / "a")
        trained.save_pretrained(tmp_path / "a")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").iterdir()} == {0o644}
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_weights_that_are_not_finite_are_not_saved(trained: CPTModel, tmp_path) -> None:
    with torch.no_grad():
        trained.delta[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        save_adapter(trained, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_adapter_module_imports_no_model() -> None:
    import ast
    import inspect

    import cpt.adapter

    tree = ast.parse(inspect.getsource(cpt.adapter))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    imported = {n.module for n in top if isinstance(n, ast.ImportFrom)}
    imported |= {f"{n.module}.{a.name}" for n in top if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "cpt.model" not in imported and "cpt.CPTModel" not in imported


# ---------------------------------------------------------------------- sizes, and other systems


@pytest.mark.parametrize("size", ["one byte over", 40 * 2**30])
@pytest.mark.parametrize(("layout", "name", "tensors"), [("cpt", CPT_WEIGHTS_NAME, 2), ("peft", PEFT_WEIGHTS_NAME, 1)])
def test_a_weights_file_larger_than_its_shapes_allow_is_refused_unread(
    trained: CPTModel, tmp_path, layout: str, name: str, tensors: int, size
) -> None:
    trained.save_pretrained(tmp_path, format=layout)
    rows, hidden = trained.delta.shape
    if size == "one byte over":
        size = weights_limit(tensors, rows, hidden) + 1
    os.truncate(tmp_path / name, size)  # sparse: nothing is written to disk
    with pytest.raises(ValueError, match=rf"adapter weights .*/{name} is larger than it can be: {size} bytes"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)


def test_saved_and_loaded_as_on_windows_and_macos(trained: CPTModel, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(_io, "_renameat2", False)  # macOS, Windows: the two-rename swap
    monkeypatch.setattr(_io, "DIR_FDS", False)  # Windows: files opened by path
    trained.save_pretrained(tmp_path / "a")
    trained.save_pretrained(tmp_path / "a")  # a replacement, too
    loaded = CPTModel.from_pretrained(make_model("llama"), tmp_path / "a")
    assert torch.equal(loaded.context_embeddings(), trained.context_embeddings())
    assert sorted(os.listdir(tmp_path)) == ["a"]
