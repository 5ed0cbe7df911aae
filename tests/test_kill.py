"""Writers killed at random instants, and writers racing each other and a reader.

Each writer is a forked child that saves version after version of an adapter (or a checkpoint)
into one folder; the version is recorded in the saved label set (or the step), and the weights
of version k are a known function of k, so a reader can tell a whole save from a mix.
"""

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from contexts import moved_model

from cpt import CPTModel, _io
from cpt._io import OLD_TAG, TMP_TAG, sibling_names
from cpt.adapter import CPT_CONFIG_NAME, CPT_WEIGHTS_NAME, read_adapter, write_adapter
from cpt.checkpoint import TrainState, load_checkpoint, save_checkpoint
from cpt.train import TrainConfig, make_optimizer

KILLS = 20
NUM_SAMPLES = 3
CONFIG = TrainConfig(batch_size=1, seed=0, progress=False)

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork to start writers cheaply"
)


@pytest.fixture(scope="module")
def model() -> CPTModel:
    model = moved_model()
    model.reference_delta = model.delta.detach().clone()  # what the versions are made from
    return model


def _delta(model: CPTModel, version: int) -> torch.Tensor:
    return model.reference_delta * (1.0 / (version + 1))  # inside the balls, different per version


def _save_adapter(model: CPTModel, path: Path, version: int, series: str = "v") -> None:
    write_adapter(
        path, model.config, model.base, _delta(model, version), vocab_size=96,
        task={"labels": [f"{series}{version}"]},
    )


def _adapter_version(model: CPTModel, path: Path) -> tuple[str, int]:
    """Loads the adapter and checks it is one whole save: (series, version)."""
    files = read_adapter(path, hidden_size=32, vocab_size=96, embed=model.base_model.get_input_embeddings())
    label = files.task["labels"][0]
    series, version = label[0], int(label[1:])
    assert torch.equal(files.delta, _delta(model, version)), f"weights of one save, label of another ({label})"
    return series, version


def _save_checkpoint(model: CPTModel, folder: Path, step: int) -> None:
    optimizer = make_optimizer(model, CONFIG)
    for _ in range(step):  # the optimizer state of `step` steps (zero gradients: delta stays)
        model.delta.grad = torch.zeros_like(model.delta)
        optimizer.step()
    model.delta.grad = None
    with torch.no_grad():
        model.delta.copy_(_delta(model, step))
    state = TrainState(step=step, epoch=step // NUM_SAMPLES, position=step % NUM_SAMPLES, losses=[0.5] * step)
    save_checkpoint(folder, model, optimizer, state, CONFIG, num_samples=NUM_SAMPLES)


def _checkpoint_step(model: CPTModel, folder: Path) -> int:
    fresh = CPTModel(model.base_model, model.config)
    state = load_checkpoint(folder, fresh, make_optimizer(fresh, CONFIG), config=CONFIG, num_samples=NUM_SAMPLES)
    assert torch.equal(fresh.delta.detach(), _delta(model, state.step))
    return state.step


def _forever(save, start: int, started) -> None:  # type: ignore[no-untyped-def]
    """A writer's life: save version after version until killed."""
    torch.set_num_threads(1)
    started.set()  # the kill's instant counts from here, not from the fork (slow on a loaded machine)
    version = start
    while True:
        save(version)
        version += 1


def _fork(target, *args) -> multiprocessing.Process:
    process = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _kill_repeatedly(save, load, path: Path, expected_files: list[str]) -> tuple[int, int]:
    """KILLS times: a writer saves over ``path`` until SIGKILL at a random instant; the folder must
    then load as a whole save no older than before. The kill's window doubles after a kill that
    let no save through, so a slow machine still sees new versions. Returns (kills that left a
    dead writer's folder behind, distinct versions seen)."""
    rng = random.Random(1234)
    started = time.perf_counter()
    save(0)
    window = 3 * (time.perf_counter() - started)  # kills land anywhere in the first few saves
    last, seen, leftovers = 0, {0}, 0
    for _ in range(KILLS):
        started = multiprocessing.get_context("fork").Event()
        writer = _fork(_forever, save, last + 1, started)
        assert started.wait(timeout=60)
        time.sleep(rng.uniform(0.0, window))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        version = load()
        if version == last:  # no save got through: on a loaded machine a save takes longer
            window *= 2
        assert version >= last  # old or new, never older, never a mix (load checks)
        # nothing half-written inside; with the two-rename swap, a writer killed between its two
        # renames leaves the whole old folder aside (what `load` read), until the next save
        aside = sibling_names(path, OLD_TAG)
        where = path if path.exists() else max(aside, key=lambda p: p.stat().st_mtime)
        assert sorted(os.listdir(where)) == expected_files
        leftovers += bool(sibling_names(path, TMP_TAG) + sibling_names(path, OLD_TAG))
        last = version
        seen.add(version)
    save(last + 1)  # the next writer cleans up after the dead ones
    assert sorted(os.listdir(path.parent)) == [path.name]
    return leftovers, len(seen)


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_killed_adapter_writers_leave_old_or_new(model: CPTModel, tmp_path: Path, monkeypatch, swap: str) -> None:
    if swap == "two renames":  # as on macOS and Windows: no RENAME_EXCHANGE, and (Windows) no folder descriptors
        monkeypatch.setattr(_io, "_renameat2", False)
        monkeypatch.setattr(_io, "DIR_FDS", False)
    path = tmp_path / "adapter"
    leftovers, versions = _kill_repeatedly(
        lambda k: _save_adapter(model, path, k),
        lambda: _adapter_version(model, path)[1],
        path,
        sorted([CPT_CONFIG_NAME, CPT_WEIGHTS_NAME]),
    )
    assert versions > 1  # the writers did get saves through between kills
    assert leftovers > 0  # and some kills did land in the middle of a save


def test_killed_checkpoint_writers_leave_old_or_new(model: CPTModel, tmp_path: Path) -> None:
    folder = tmp_path / "last"
    leftovers, versions = _kill_repeatedly(
        lambda k: _save_checkpoint(model, folder, k),
        lambda: _checkpoint_step(model, folder),
        folder,
        ["adapter", "trainer_state.json", "trainer_state.safetensors"],
    )
    assert versions > 1 and leftovers > 0


def _saves(save, count: int) -> None:
    torch.set_num_threads(1)
    for version in range(1, count + 1):
        save(version)


def test_concurrent_adapter_writers_and_a_reader(model: CPTModel, tmp_path: Path) -> None:
    path = tmp_path / "adapter"
    _save_adapter(model, path, 0, "a")
    writers = [_fork(_saves, lambda k, s=series: _save_adapter(model, path, k, s), 40) for series in "ab"]
    reads = set()
    while any(w.is_alive() for w in writers):
        reads.add(_adapter_version(model, path))  # every read: one whole save of one writer
    assert [w.join() or w.exitcode for w in writers] == [0, 0]  # neither writer broke the other
    reads.add(_adapter_version(model, path))
    assert {series for series, _ in reads} == {"a", "b"} and len(reads) > 2
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_two_runs_checkpointing_into_one_folder(model: CPTModel, tmp_path: Path) -> None:
    folder = tmp_path / "last"
    writers = [_fork(_saves, lambda k: _save_checkpoint(model, folder, k), 15) for _ in range(2)]
    steps = set()
    while any(w.is_alive() for w in writers):
        if folder.exists():
            steps.add(_checkpoint_step(model, folder))
    assert [w.join() or w.exitcode for w in writers] == [0, 0]
    assert _checkpoint_step(model, folder) == 15
    assert sorted(os.listdir(tmp_path)) == ["last"]
    assert steps <= set(range(1, 16))
