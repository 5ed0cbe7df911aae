"""Checkpoints: replaced whole, every file checksummed, every field checked before a resume,
and a resume that ends where an uninterrupted run ends, selection included."""

import dataclasses
import json
import math
import os
import random
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_schema import WRONG as _WRONG
from test_schema import _paths
from tiny_models import make_model
from tokenizers_util import make_wordlevel_tokenizer

from cpt import _io
from cpt.checkpoint import (
    ADAPTER_DIR,
    LAST_CHECKPOINT_NAME,
    STATE_JSON_NAME,
    STATE_TENSORS_NAME,
    TrainState,
    _sha256,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from cpt.data import CPTCollator, CPTDataset, Example, build_context
from cpt.model import CPTModel
from cpt.numerics import NonFiniteError
from cpt.selection import LeaveOneOut
from cpt.train import TrainConfig, make_optimizer, train
from cpt.workflow import fit

EXAMPLES = [Example("the movie was great", "positive"), Example("awful", "negative"), Example("fine", "positive")]
CONFIG = TrainConfig(learning_rate=1e-2, max_steps=2, progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordlevel_tokenizer()


@pytest.fixture(scope="module")
def context(tokenizer):
    return build_context(tokenizer, EXAMPLES)


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return CPTDataset(tokenizer, EXAMPLES)


@pytest.fixture(scope="module")
def collator(tokenizer):
    return CPTCollator(tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def saved(context, dataset, collator, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    train(CPTModel(make_model(), context), dataset, CONFIG, collator=collator, checkpoint_dir=root)
    return root / LAST_CHECKPOINT_NAME


@pytest.fixture
def folder(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / LAST_CHECKPOINT_NAME
    shutil.copytree(saved, copy)
    return copy


def resume(context, folder: Path, num_samples: int = 3) -> TrainState:
    model = CPTModel(make_model(), context)
    return load_checkpoint(folder, model, make_optimizer(model, CONFIG), config=CONFIG, num_samples=num_samples)


def edit_state(folder: Path, change, resign: bool = True) -> None:
    """Changes trainer_state.json; ``resign`` also fixes its own checksum (a careful forger)."""
    meta = json.loads((folder / STATE_JSON_NAME).read_text())
    change(meta)
    if resign:
        meta.pop("state_sha256", None)
        meta["state_sha256"] = _sha256(_io.json_bytes(meta))
    (folder / STATE_JSON_NAME).write_text(json.dumps(meta))


def test_a_checkpoint_resumes(context, folder: Path) -> None:
    state = resume(context, folder)
    assert (state.step, state.epoch, state.position, len(state.losses)) == (2, 0, 2, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(position=999), r"field 'position' is 999, but an epoch of 3 samples has 3 batches"),
        (lambda m: m.update(position=-1), r"field 'position' must be an integer >= 0, got -1"),
        (lambda m: m.update(step=1000), r"field 'step' is 1000, but epoch 0 and position 2 mean 2 steps"),
        (lambda m: m.update(step="2"), r"field 'step' must be an integer >= 0, got '2'"),
        (lambda m: m.update(epoch=True), r"field 'epoch' must be an integer >= 0, got True"),
        (lambda m: m.pop("losses"), r"field 'losses' is missing"),
        (lambda m: m.update(losses=[1.0]), r"field 'losses' holds 1 losses, but the run took 2 steps"),
        (lambda m: m.update(losses=[1.0, "x"]), r"field 'losses\[1\]' must be a finite number, got 'x'"),
        (lambda m: m.update(eval_history=[{"step": 9}]), r"field 'eval_history\[0\].step' must be in 1..2, got 9"),
        (lambda m: m.update(config=[]), r"field 'config' must be an object, got \[\]"),
        (lambda m: m["config"].update(batch_size=0), r"field 'config.batch_size' must be an integer >= 1, got 0"),
        (lambda m: m.update(num_samples=None), r"field 'num_samples' must be an integer >= 1, got None"),
        (lambda m: m.update(python_rng=[3, [1, 2], None]), r"field 'python_rng\[1\]' must be a list of 625, got \[1, 2\]"),
        (lambda m: m["python_rng"].__setitem__(0, 99), r"field 'python_rng' is not a Python random state"),
        (lambda m: m.update(optimizer={"state": {}}), r"field 'optimizer.param_groups' is missing"),
        (lambda m: m["optimizer"]["state"]["0"].update(exp_avg={"tensor": "nope"}), r"'optimizer.state.0.exp_avg' must name a saved tensor"),
        (lambda m: m["optimizer"]["param_groups"][0].update(betas="x"), r"field 'optimizer.param_groups\[0\].betas' must be a list of 2, got 'x'"),
        (lambda m: m.update(format_version=1), r"written by an older cpt \(format 1"),
        (lambda m: m.update(format_version=99), r"written by a newer cpt \(format version 99\)"),
        (lambda m: m.update(format="x"), r"field 'format' must be \"cpt-trainer-state\", got 'x'"),
        (lambda m: m["files_sha256"].pop(STATE_TENSORS_NAME), r"field 'files_sha256\[\"trainer_state.safetensors\"\]' is missing"),
    ],
)
def test_every_field_is_checked(context, folder: Path, change, message: str) -> None:
    edit_state(folder, change)
    with pytest.raises(ValueError, match=message):
        resume(context, folder)


def test_an_edited_state_file_is_detected(context, folder: Path) -> None:
    edit_state(folder, lambda m: m.update(step=1, position=1, losses=[1.0]), resign=False)
    with pytest.raises(ValueError, match=r"field 'state_sha256' .* not the checksum of the file's other fields"):
        resume(context, folder)


def test_an_adapter_from_another_checkpoint_is_detected(context, dataset, collator, folder: Path, tmp_path: Path) -> None:
    train(CPTModel(make_model(), context), dataset, TrainConfig(learning_rate=1e-1, max_steps=3, progress=False),
          collator=collator, checkpoint_dir=tmp_path / "other")
    shutil.rmtree(folder / ADAPTER_DIR)
    shutil.copytree(tmp_path / "other" / LAST_CHECKPOINT_NAME / ADAPTER_DIR, folder / ADAPTER_DIR)
    with pytest.raises(ValueError, match=r"adapter/cpt_\w+.\w+ does not match trainer_state.json \(checksum differs\)"):
        resume(context, folder)


@pytest.mark.parametrize("name", [STATE_TENSORS_NAME, f"{ADAPTER_DIR}/cpt_config.json"])
def test_a_changed_file_is_detected(context, folder: Path, name: str) -> None:
    path = folder / name
    path.write_bytes(path.read_bytes() + b" ")
    with pytest.raises(ValueError, match="checksum differs"):
        resume(context, folder)


def edit_tensors(folder: Path, change) -> None:
    """Changes trainer_state.safetensors, and its checksum in trainer_state.json (a careful forger)."""
    path = folder / STATE_TENSORS_NAME
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "cpt-trainer-state"})
    edit_state(folder, lambda m: m["files_sha256"].update({STATE_TENSORS_NAME: _sha256(path.read_bytes())}))


def assert_refused_untouched(context, folder: Path, message: str) -> None:
    """A resume from ``folder`` is refused with one ValueError naming it, and the model, the
    optimizer and the global RNGs are as they were."""
    model = CPTModel(make_model(), context)
    with torch.no_grad():
        model.delta.fill_(0.25)
    optimizer = make_optimizer(model, CONFIG)
    before = (model.delta.detach().clone(), torch.get_rng_state(), random.getstate())
    with pytest.raises(ValueError, match=message) as refusal:
        load_checkpoint(folder, model, optimizer, config=CONFIG, num_samples=3)
    assert str(folder) in str(refusal.value)
    assert torch.equal(model.delta, before[0]) and torch.equal(torch.get_rng_state(), before[1])
    assert random.getstate() == before[2]
    assert optimizer.state_dict()["state"] == {}


def test_nothing_changes_unless_everything_is_sound(context, folder: Path) -> None:
    edit_state(folder, lambda m: m["optimizer"]["param_groups"][0].update(params=[0, 1]))
    assert_refused_untouched(context, folder, r"field 'optimizer.param_groups\[0\].params' must be a list of 1, got \[0, 1\]")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["optimizer"]["state"]["0"].pop("exp_avg_sq"), r"field 'optimizer.state.0.exp_avg_sq' is missing"),
        (lambda m: m["optimizer"]["state"]["0"].update(step={"value": 2}), r"field 'optimizer.state.0.step.tensor' is missing"),
        (lambda m: m["optimizer"]["state"].update({"1": m["optimizer"]["state"]["0"]}), r"field 'optimizer.state' has unknown keys \['1'\]"),
        (lambda m: m["optimizer"]["state"]["0"].update(exp_avg={"tensor": "rng.torch"}), r"tensor 'rng.torch' must be torch.float32 of shape"),
        (lambda m: m["optimizer"].update(state={}), r"field 'optimizer.state.0' is missing"),
        (lambda m: m["optimizer"]["param_groups"][0].pop("eps"), r"field 'optimizer.param_groups\[0\].eps' is missing"),
        (lambda m: m["optimizer"]["param_groups"][0].update(lr=-1.0), r"field 'optimizer.param_groups\[0\].lr' must be a finite number >= 0, got -1.0"),
        (lambda m: m["optimizer"]["param_groups"][0].update(amsgrad=1), r"field 'optimizer.param_groups\[0\].amsgrad' must be true or false, got 1"),
    ],
)
def test_an_optimizer_state_the_optimizer_would_not_take_is_refused_before_anything_changes(
    context, folder: Path, change, message: str
) -> None:
    edit_state(folder, change)
    assert_refused_untouched(context, folder, message)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update({"optimizer.0.step": torch.tensor(-1.0)}), r"'optimizer.0.step' holds a value out of range"),
        (lambda t: t.update({"optimizer.0.step": torch.tensor(5.0)}), r"'optimizer.0.step' counts 5.0 steps, the run took 2"),
        (lambda t: t.update({"optimizer.0.step": torch.tensor(2)}), r"'optimizer.0.step' must be torch.float32 of shape \(\)"),
        (lambda t: t.update({"optimizer.0.exp_avg": t["optimizer.0.exp_avg"].double()}), r"must be torch.float32 of shape"),
        (lambda t: t.update({"optimizer.0.exp_avg": t["optimizer.0.exp_avg"][:1]}), r"must be torch.float32 of shape"),
        (lambda t: t.update({"optimizer.0.exp_avg_sq": -t["optimizer.0.exp_avg_sq"] - 1}), r"'optimizer.0.exp_avg_sq' holds a value out of range"),
        (lambda t: t.update({"optimizer.0.exp_avg": t["optimizer.0.exp_avg"] * math.nan}), r"holds a value out of range"),
        (lambda t: t.update({"optimizer.9.exp_avg": torch.zeros(1)}), r"has unexpected tensors \['optimizer.9.exp_avg'\]"),
        (lambda t: t.update({"rng.torch": torch.full_like(t["rng.torch"], 255)}), r"tensor 'rng.torch' is not a cpu RNG state"),
        (lambda t: t.update({"rng.torch": t["rng.torch"][:-1]}), r"tensor 'rng.torch' is not a cpu RNG state"),
        (lambda t: t.update({"rng.cuda.1": torch.zeros(16, dtype=torch.uint8)}), r"RNG tensors must be 'rng.torch' and 'rng.cuda.0..n-1'"),
    ],
)
def test_bad_optimizer_and_rng_tensors_are_refused_before_anything_changes(
    context, folder: Path, change, message: str
) -> None:
    edit_tensors(folder, change)
    assert_refused_untouched(context, folder, message)


def test_a_failed_save_leaves_the_previous_checkpoint(context, folder: Path, monkeypatch) -> None:
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    model = CPTModel(make_model(), context)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_io, "write_bytes", crash)
    state = TrainState()  # step 0: a fresh optimizer's state
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(folder, model, make_optimizer(model, CONFIG), state, CONFIG, num_samples=3)
    monkeypatch.undo()
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(os.listdir(folder.parent)) == [LAST_CHECKPOINT_NAME]
    assert resume(context, folder).step == 2


def test_an_inconsistent_state_is_not_saved(context, tmp_path: Path) -> None:
    model = CPTModel(make_model(), context)
    with pytest.raises(ValueError, match="field 'step' is 99, but epoch 0 and position 0 mean 0 steps"):
        save_checkpoint(tmp_path / "c", model, make_optimizer(model, CONFIG), TrainState(step=99), CONFIG, num_samples=3)
    assert not (tmp_path / "c").exists()
    state = TrainState(step=1, epoch=0, position=1, losses=[1.0])  # but the optimizer never stepped
    with pytest.raises(ValueError, match=r"field 'optimizer.state.0' is missing"):
        save_checkpoint(tmp_path / "c", model, make_optimizer(model, CONFIG), state, CONFIG, num_samples=3)
    assert not (tmp_path / "c").exists()


def test_files_are_readable_by_others(saved: Path) -> None:
    modes = {stat.S_IMODE(p.stat().st_mode) for p in saved.rglob("*") if p.is_file()}
    folders = {stat.S_IMODE(p.stat().st_mode) for p in [saved, saved / ADAPTER_DIR]}
    umask = _io._umask()
    assert modes == {0o666 & ~umask} and folders == {0o777 & ~umask}


def test_training_stops_at_the_first_non_finite_step(context, dataset, collator, tmp_path: Path) -> None:
    model = CPTModel(make_model(), context)
    train(model, dataset, CONFIG, collator=collator, checkpoint_dir=tmp_path)
    good = model.delta.detach().clone()
    with torch.no_grad():  # a base model that overflows from now on
        model.base_model.get_input_embeddings().weight.mul_(float("inf"))
    config = TrainConfig(learning_rate=1e-2, max_steps=4, progress=False, checkpoint_every=1)
    with pytest.raises(NonFiniteError, match=r"training stopped at step 3: the loss is nan"):
        train(model, dataset, config, collator=collator, checkpoint_dir=tmp_path, resume_from=tmp_path / LAST_CHECKPOINT_NAME)
    assert torch.equal(model.delta, good)  # the update was not applied
    assert resume(context, tmp_path / LAST_CHECKPOINT_NAME).step == 2  # the last checkpoint is good


@pytest.mark.parametrize("name", [STATE_TENSORS_NAME, f"{ADAPTER_DIR}/cpt_adapter.safetensors"])
def test_a_file_larger_than_the_context_allows_is_refused_unread(context, folder: Path, name: str) -> None:
    os.truncate(folder / name, 40 * 2**30)  # sparse: nothing is written to disk
    with pytest.raises(ValueError, match=rf"checkpoint file .*/{name} is larger than it can be: {40 * 2**30} bytes"):
        resume(context, folder)


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_training(
    context, dataset, collator, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("mine")
    model = CPTModel(make_model(), context)
    before = model.delta.detach().clone()
    with pytest.raises(ValueError, match=r"cannot write .*/file/last: .*/file is a file, not a folder"):
        train(model, dataset, CONFIG, collator=collator, checkpoint_dir=tmp_path / "file")
    assert torch.equal(model.delta.detach(), before)  # not one step was taken


# ---------------------------------------------------------------------- what a resume must reproduce

POSITIVE_HEAVY = [  # 2 examples of each label, so leave-one-out selects
    Example("the movie was great", "positive"), Example("awful", "negative"), Example("fine", "positive"),
    Example("boring and too long", "negative"), Example("a fine story", "positive"), Example("great", "positive"),
]
ALL_POSITIVE = [Example(e.text, "positive") for e in POSITIVE_HEAVY if e.label == "positive"]


def test_fit_resumed_with_leave_one_out_ends_where_an_uninterrupted_run_ends(tokenizer, tmp_path: Path) -> None:
    # Here the best context by leave-one-out is step 2's, before the interruption at step 4
    # (the checkpoint is step 3's): a resume that forgot it returned step 4's context.
    config = TrainConfig(learning_rate=1.0, max_steps=8, checkpoint_every=3, progress=False)

    def run(folder: Path, **kwargs):
        return fit(make_model(seed=2), tokenizer, POSITIVE_HEAVY, train_examples=ALL_POSITIVE,
                   train_config=config, checkpoint_dir=folder, **kwargs)

    whole, expected = run(tmp_path / "whole")
    steps = [entry["step"] for entry in expected.eval_history]
    best = max(range(len(steps)), key=lambda i: expected.eval_history[i]["loo_log_prob"])
    assert steps == [0, 2, 4, 6, 8] and steps[best] == 2  # the case this test is about

    def interrupt_at_step_4(model: CPTModel) -> dict[str, float]:
        if interrupt_at_step_4.calls == 1:
            raise KeyboardInterrupt
        interrupt_at_step_4.calls += 1
        return {}

    interrupt_at_step_4.calls = 0
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "interrupted", eval_fn=interrupt_at_step_4)
    assert json.loads((tmp_path / "interrupted" / LAST_CHECKPOINT_NAME / STATE_JSON_NAME).read_text())["step"] == 3
    resumed, result = run(tmp_path / "interrupted", resume_from=tmp_path / "interrupted" / LAST_CHECKPOINT_NAME)
    assert torch.equal(resumed.delta, whole.delta)
    assert result.eval_history == expected.eval_history and result.losses == expected.losses


def test_resume_refuses_other_training_data_of_the_same_size(tokenizer, context, folder: Path) -> None:
    others = [Example("boring", "negative"), Example("great", "positive"), Example("thin", "negative")]
    model = CPTModel(make_model(), context)
    with pytest.raises(ValueError, match=r"cannot resume from .*/last: it was trained on different training samples"):
        train(model, CPTDataset(tokenizer, others), CONFIG, collator=CPTCollator(tokenizer.pad_token_id),
              resume_from=folder)
    relabelled = [Example(e.text, "negative" if e.label == "positive" else "positive") for e in EXAMPLES]
    with pytest.raises(ValueError, match=r"different training samples \(token ids or type codes\)"):
        train(model, CPTDataset(tokenizer, relabelled), CONFIG, collator=CPTCollator(tokenizer.pad_token_id),
              resume_from=folder)
    assert torch.equal(model.delta, torch.zeros_like(model.delta))  # nothing loaded


def test_the_fingerprint_reads_what_training_reads(context, dataset) -> None:
    as_tensors = [{k: torch.tensor(v) for k, v in dataset[i].items()} for i in range(len(dataset))]
    assert fingerprint(context, as_tensors) == fingerprint(context, dataset)  # the same ids and codes
    shifted = [{**dataset[i], "input_type_mask": [0, *dataset[i]["input_type_mask"][1:]]} for i in range(len(dataset))]
    assert fingerprint(context, shifted)["samples"] != fingerprint(context, dataset)["samples"]
    with pytest.raises(ValueError, match=r"cannot fingerprint training sample 1 for a checkpoint: it holds nan"):
        fingerprint(context, [dataset[0], {"input_ids": [math.nan]}])


@pytest.mark.parametrize(("field", "value"), [("learning_rate", 0.5), ("weight_decay", 0.1), ("max_grad_norm", None)])
def test_resume_refuses_another_update_rule(context, dataset, collator, folder: Path, field: str, value) -> None:
    # Each changes every step after the resume: the adapter would be neither run's.
    model = CPTModel(make_model(), context)
    config = dataclasses.replace(CONFIG, max_steps=4, **{field: value})
    with pytest.raises(ValueError, match=rf"cannot resume from .*/last: it was trained with {field}=.*the updates would differ"):
        train(model, dataset, config, collator=collator, resume_from=folder)
    assert torch.equal(model.delta, torch.zeros_like(model.delta))  # nothing loaded


def test_resume_refuses_another_selection_option(context, dataset, collator, folder: Path, tokenizer) -> None:
    model = CPTModel(make_model(), context)
    selector = LeaveOneOut(tokenizer, EXAMPLES, ["positive", "negative"])
    with pytest.raises(ValueError, match=r"its run kept no selection state, this one does"):
        train(model, dataset, CONFIG, collator=collator, eval_fn=selector, selector=selector, resume_from=folder)


# ---------------------------------------------------------------------- every field, every wrong type

SELECTED_CONFIG = TrainConfig(learning_rate=1e-2, max_steps=2, eval_every=1, progress=False)
LABELS = ["positive", "negative"]


@pytest.fixture(scope="module")
def selected(tokenizer, tmp_path_factory) -> dict:
    """A checkpoint with every field filled: a selection state, evaluations, moments, RNGs."""
    context = build_context(tokenizer, POSITIVE_HEAVY[:4])
    dataset = CPTDataset(tokenizer, POSITIVE_HEAVY[:4])
    root = tmp_path_factory.mktemp("selected")
    selector = LeaveOneOut(tokenizer, POSITIVE_HEAVY[:4], LABELS)
    train(CPTModel(make_model(), context), dataset, SELECTED_CONFIG, collator=CPTCollator(tokenizer.pad_token_id),
          eval_fn=selector, selector=selector, checkpoint_dir=root)
    assert selector.state.best_call is not None
    return {"folder": root / LAST_CHECKPOINT_NAME, "context": context, "dataset": dataset,
            "model": CPTModel(make_model(), context), "tokenizer": tokenizer}


def resume_selected(selected: dict, folder: Path) -> None:
    """`train`'s resume of ``folder`` (the run is complete: nothing trains after the load)."""
    selector = LeaveOneOut(selected["tokenizer"], POSITIVE_HEAVY[:4], LABELS)
    train(selected["model"], selected["dataset"], SELECTED_CONFIG,
          collator=CPTCollator(selected["tokenizer"].pad_token_id), eval_fn=selector, selector=selector,
          resume_from=folder)


def _kind(value) -> type:
    return type(value) if value is None or isinstance(value, (bool, int, float, str, list, dict)) else object


_ALSO_RIGHT = {  # kinds a field takes besides its saved one
    ("python_rng", 2): {int, float},
    ("config", "max_grad_norm"): {type(None), int},
    ("config", "cuda_graphs"): {bool, type(None)},
    **{("config", name): {type(None), int} for name in ("max_steps", "eval_every", "checkpoint_every")},
}


def _holder(meta, path):
    for key in path[:-1]:
        meta = meta[key]
    return meta


def _wrong_kinds(meta: dict, path: tuple) -> list[type]:
    saved = _kind(_holder(meta, path)[path[-1]])
    right = {saved, *_ALSO_RIGHT.get(path, ())} | ({int} if saved is float else set())
    if path[0] == "eval_history" and path[-1] != "step":
        right |= {int, float}
    return [kind for kind in _WRONG if kind not in right]


def _saved_meta(selected: dict) -> dict:
    return json.loads((selected["folder"] / STATE_JSON_NAME).read_text())


def _json_fields(selected: dict) -> list[tuple]:
    return [p for p in _paths(_saved_meta(selected)) if p[0] != "state_sha256" and _wrong_kinds(_saved_meta(selected), p)]


def _refused(selected: dict, edit) -> str:
    """Copies the checkpoint, edits the copy, resumes it: returns the ValueError's message."""
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / LAST_CHECKPOINT_NAME
        shutil.copytree(selected["folder"], folder)
        edit(folder)
        before = selected["model"].delta.detach().clone()
        with pytest.raises(ValueError) as refusal:  # never another exception, never a silent load
            resume_selected(selected, folder)
        assert torch.equal(selected["model"].delta, before)
        return str(refusal.value)


PROPERTIES = settings(max_examples=120, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_the_selected_checkpoint_resumes(selected: dict) -> None:
    resume_selected(selected, selected["folder"])  # the reference for the refusals below


@PROPERTIES
@given(data=st.data())
def test_every_json_field_of_a_wrong_type_is_refused(selected: dict, data) -> None:
    meta = _saved_meta(selected)
    path = data.draw(st.sampled_from(_json_fields(selected)), label="field")
    value = data.draw(st.sampled_from(_wrong_kinds(meta, path)).flatmap(_WRONG.__getitem__), label="value")
    _refused(selected, lambda folder: edit_state(folder, lambda m: _holder(m, path).__setitem__(path[-1], value)))


@PROPERTIES
@given(data=st.data())
def test_every_json_key_removed_is_refused(selected: dict, data) -> None:
    meta = _saved_meta(selected)
    free = lambda p: p[0] == "eval_history" and len(p) == 3 and p[-1] != "step"  # metrics: any names
    keys = [p for p in _json_fields(selected) if isinstance(_holder(meta, p), dict) and not free(p)]
    path = data.draw(st.sampled_from(keys), label="field")
    _refused(selected, lambda folder: edit_state(folder, lambda m: _holder(m, path).pop(path[-1])))


OUT_OF_RANGE = [
    (("step",), -1), (("step",), 3), (("epoch",), -1), (("position",), 5), (("num_samples",), 0),
    (("num_samples",), 5), (("format_version",), 0), (("config", "batch_size"), 0), (("config", "seed"), -1),
    (("config", "learning_rate"), 0.0), (("config", "learning_rate"), -1.0), (("config", "max_grad_norm"), -1.0),
    (("config", "mixed_precision"), "fp8"), (("config", "max_steps"), 0),
    (("python_rng", 1, 0), 2**32), (("python_rng", 1, 0), -1), (("python_rng", 1, 624), 625),
    (("optimizer", "param_groups", 0, "lr"), -1.0), (("optimizer", "param_groups", 0, "betas", 0), 1.5),
    (("optimizer", "param_groups", 0, "eps"), -1e-8), (("optimizer", "param_groups", 0, "params", 0), 1),
    (("selection", "calls"), -1), (("selection", "calls"), 0), (("selection", "calls"), 9), (("selection", "best_call"), -1),
    (("selection", "best_call"), 99), (("selection", "best_score"), "nan"), (("selection", "best_score"), "-inf"),
    (("fingerprint", "samples"), "0" * 64), (("fingerprint", "context"), "x" * 64), (("fingerprint", "context"), "ab"),
    (("eval_history", 0, "step"), 0), (("eval_history", 0, "step"), 3), (("eval_history", 1, "step"), 1), (("eval_history", 0, "loo_accuracy"), "NaN"),
    (("files_sha256", STATE_TENSORS_NAME), "0" * 64),
]


@pytest.mark.parametrize(("path", "value"), OUT_OF_RANGE, ids=[f"{'.'.join(map(str, p))}={v!r}" for p, v in OUT_OF_RANGE])
def test_every_json_field_out_of_range_is_refused(selected: dict, path: tuple, value) -> None:
    _refused(selected, lambda folder: edit_state(folder, lambda m: _holder(m, path).__setitem__(path[-1], value)))


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]


def _tensor_change(tensors: dict, key: str, how: str, dtype: torch.dtype) -> None:
    tensor = tensors[key]
    if how == "delete":
        del tensors[key]
    elif how == "dtype":
        tensors[key] = tensor.to(dtype if dtype != tensor.dtype else torch.int16)
    elif how == "shape":
        tensors[key] = tensor.reshape(-1)[:-1].clone() if tensor.numel() > 1 else torch.stack([tensor, tensor])
    elif how == "extra dimension":
        tensors[key] = tensor.unsqueeze(0)
    elif how == "out of range":  # non-finite moments, a negative step or second moment, a bad RNG state
        if tensor.dtype == torch.uint8:
            tensors[key] = torch.full_like(tensor, 255)
        else:
            tensors[key] = -tensor - 1 if key.endswith(("step", "exp_avg_sq")) else tensor * math.inf
    else:  # a tensor no field names
        tensors[f"{key}.copy"] = tensor.clone()


@PROPERTIES
@given(data=st.data())
def test_every_tensor_of_a_wrong_kind_is_refused(selected: dict, data) -> None:
    keys = sorted(load_file(selected["folder"] / STATE_TENSORS_NAME))
    assert "selection.best_delta" in keys and "rng.torch" in keys
    key = data.draw(st.sampled_from(keys), label="tensor")
    how = data.draw(st.sampled_from(["delete", "dtype", "shape", "extra dimension", "out of range", "extra"]), label="how")
    dtype = data.draw(st.sampled_from(_DTYPES), label="dtype")
    message = _refused(selected, lambda folder: edit_tensors(folder, lambda t: _tensor_change(t, key, how, dtype)))
    assert STATE_TENSORS_NAME in message or STATE_JSON_NAME in message
