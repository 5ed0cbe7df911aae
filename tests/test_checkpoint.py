"""Checkpoints: replaced whole, every file checksummed, every field checked before a resume."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
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
    load_checkpoint,
    save_checkpoint,
)
from cpt.data import CPTCollator, CPTDataset, Example, build_context
from cpt.model import CPTModel
from cpt.numerics import NonFiniteError
from cpt.train import TrainConfig, make_optimizer, train

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
        (lambda m: m.pop("losses"), r"field 'losses' must be a list of 2 numbers \(one per step\), got None"),
        (lambda m: m.update(losses=[1.0, "x"]), r"field 'losses\[1\]' must be a finite number, got 'x'"),
        (lambda m: m.update(eval_history=[{"step": 9}]), r"field 'eval_history\[0\]' must be an object with a 'step' in 1..2"),
        (lambda m: m.update(config=[]), r"field 'config' must be an object, got \[\]"),
        (lambda m: m["config"].update(batch_size=0), r"field 'config.batch_size' must be an integer >= 1, got 0"),
        (lambda m: m.update(num_samples=None), r"field 'num_samples' must be an integer >= 1, got None"),
        (lambda m: m.update(python_rng=[3, [1, 2], None]), r"field 'python_rng' is not a Python random state"),
        (lambda m: m.update(optimizer={"state": {}}), r"field 'optimizer' must hold 'state' and 'param_groups'"),
        (lambda m: m["optimizer"]["state"]["0"].update(exp_avg={"tensor": "nope"}), r"names tensor 'nope', which is not saved"),
        (lambda m: m["optimizer"]["param_groups"][0].update(betas="x"), r"field 'optimizer.param_groups\[0\].betas' is 'x'"),
        (lambda m: m.update(format_version=1), r"written by an older cpt \(format 1"),
        (lambda m: m.update(format_version=99), r"written by a newer cpt \(format version 99\)"),
        (lambda m: m.update(format="x"), r"field 'format' must be 'cpt-trainer-state', got 'x'"),
        (lambda m: m["files_sha256"].pop(STATE_TENSORS_NAME), r"field 'files_sha256' must map exactly"),
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


def test_nothing_changes_unless_everything_is_sound(context, folder: Path) -> None:
    # sound on paper, refused by the optimizer itself: the last step of a load
    edit_state(folder, lambda m: m["optimizer"]["param_groups"][0].update(params=[0, 1]))
    model = CPTModel(make_model(), context)
    optimizer = make_optimizer(model, CONFIG)
    before, torch_rng = model.delta.detach().clone(), torch.get_rng_state()
    with pytest.raises(ValueError, match="cannot load the optimizer state"):
        load_checkpoint(folder, model, optimizer, config=CONFIG, num_samples=3)
    assert torch.equal(model.delta, before) and torch.equal(torch.get_rng_state(), torch_rng)
    assert optimizer.state_dict()["state"] == {}


def test_a_failed_save_leaves_the_previous_checkpoint(context, folder: Path, monkeypatch) -> None:
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    model = CPTModel(make_model(), context)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_io, "write_bytes", crash)
    state = TrainState(step=1, epoch=0, position=1, losses=[1.0])
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
