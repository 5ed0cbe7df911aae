"""Bad command lines: one line on stderr, exit status 2, and no training started."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from test_cli import adapter, data_file, model_dir  # noqa: F401 - the tiny model folder, data file, adapter

import cpt.workflow
from cpt import _io
from cpt.cli import main
from cpt.train import MAX_LEARNING_RATE


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(cpt.workflow, "fit", fail)


def _train(model_dir: Path, data_file: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data_file), "--per-class", "1", "--epochs", "1",
            "--no-progress", "--test", "2", "--output", str(output), *extra]


def _one_line(argv: list[str], capsys) -> str:
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own refusals
        status = exit.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("foo", "--device 'foo' is not a device name"),
        ("meta", "--device 'meta' holds no weights"),
        ("cuda:5", "--device 'cuda:5': "),
        ("cuda", None),
    ],
)
def test_bad_devices(model_dir, data_file, tmp_path, capsys, no_training, device: str, message: str | None) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    line = _one_line(_train(model_dir, data_file, tmp_path / "o", "--device", device), capsys)
    assert (message or f"--device '{device}': this machine has no cuda device") in line


def test_output_that_is_a_file_or_under_one(model_dir, data_file, tmp_path, capsys, no_training) -> None:
    (tmp_path / "file").write_text("mine")
    line = _one_line(_train(model_dir, data_file, tmp_path / "file", "--device", "cpu"), capsys)
    assert line.endswith("/file: it is a file, not a folder")
    line = _one_line(_train(model_dir, data_file, tmp_path / "file" / "adapter", "--device", "cpu"), capsys)
    assert "file is a file, not a folder" in line
    assert (tmp_path / "file").read_text() == "mine"


def test_output_folder_not_writable(model_dir, data_file, tmp_path, capsys, no_training, monkeypatch) -> None:
    monkeypatch.setattr("os.access", lambda path, mode: not mode & os.W_OK)  # root may write anywhere: pretend
    line = _one_line(_train(model_dir, data_file, tmp_path / "o", "--device", "cpu"), capsys)
    assert "is not writable" in line


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("", "argument --output: an empty path names no folder"),
        (".", "--output: cannot write '.': it names no folder of its own; give one, such as adapter"),
        ("..", "--output: cannot write '..': it names no folder of its own; give one, such as ../adapter"),
    ],
)
def test_outputs_that_name_no_folder(model_dir, data_file, tmp_path, capsys, no_training, monkeypatch, output, message) -> None:
    monkeypatch.chdir(tmp_path)
    line = _one_line(_train(model_dir, data_file, output, "--device", "cpu"), capsys)  # type: ignore[arg-type]
    assert line.startswith(f"cpt train: error: {message}")
    assert os.listdir(tmp_path) == []


def test_checkpoint_dir_that_cannot_be_written(model_dir, data_file, tmp_path, capsys, no_training) -> None:
    (tmp_path / "file").write_text("mine")
    argv = _train(model_dir, data_file, tmp_path / "o", "--device", "cpu", "--checkpoint-dir", str(tmp_path / "file"))
    line = _one_line(argv, capsys)
    assert line == f"cpt train: error: --checkpoint-dir: cannot write {tmp_path}/file/last: {tmp_path}/file is a file, not a folder"


@pytest.mark.parametrize("lr", ["1e39", "3.5e37", repr(math.nextafter(MAX_LEARNING_RATE, math.inf)), "nan", "0", "-1", "1e-320", "1e-39"])
def test_learning_rates_adamw_cannot_step(model_dir, data_file, tmp_path, capsys, no_training, lr: str) -> None:
    from cpt.train import SMALLEST_NORMAL

    line = _one_line(_train(model_dir, data_file, tmp_path / "o", "--device", "cpu", "--lr", lr), capsys)
    assert f"--lr must be a number in [{SMALLEST_NORMAL!r}, {MAX_LEARNING_RATE!r}] (AdamW's float32 range), got {float(lr)}" in line


def test_learning_rate_at_the_bound_trains(model_dir, data_file, tmp_path, no_training) -> None:
    with pytest.raises(AssertionError, match="training started"):  # past every check
        main(_train(model_dir, data_file, tmp_path / "o", "--device", "cpu", "--lr", repr(MAX_LEARNING_RATE)))


def test_unreadable_data(model_dir, tmp_path, capsys, no_training, monkeypatch) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "b"}\n')
    real = os.open  # root reads any file, so the refusal is the OS's answer for this path alone
    monkeypatch.setattr(os, "open", lambda name, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if str(name) == str(path) else real(name, *a, **k))
    line = _one_line(_train(model_dir, path, tmp_path / "o", "--device", "cpu"), capsys)
    assert line.endswith("cannot read dataset file " + str(path) + ": Permission denied")


@pytest.mark.parametrize("errno, text", [(28, "No space left on device"), (13, "Permission denied")])
def test_a_failed_save_is_one_line(model_dir, data_file, tmp_path, capsys, monkeypatch, errno: int, text: str) -> None:
    def fail(path, data):
        raise OSError(errno, text)

    monkeypatch.setattr(_io, "write_bytes", fail)
    line = _one_line(_train(model_dir, data_file, tmp_path / "o", "--device", "cpu"), capsys)
    assert f"cannot write {tmp_path / 'o'}: {text}" in line
    assert not (tmp_path / "o").exists()


def test_texts_and_labels_with_bytes_that_are_not_utf8(model_dir, adapter, capsys) -> None:
    # Python hands a command-line byte that is not UTF-8 over as a lone surrogate (surrogateescape).
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    base = ["--model", str(model_dir), "--adapter", str(adapter), "--no-progress"]
    line = _one_line(["predict", *base, "fine", bad], capsys)
    assert line == r"cpt predict: error: text 2 is not valid Unicode: a lone surrogate '\udce9' at character 3 (bytes that are not UTF-8?)"
    with pytest.raises(SystemExit, match="2"):
        main(["predict", *base, "--labels", f"pos,{bad}", "fine"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cpt predict: error: argument --labels: the list is not valid Unicode")
    line = _one_line(["generate", *base, "--max-new-tokens", "1", bad], capsys)
    assert line.startswith("cpt generate: error: texts[0] is not valid Unicode: a lone surrogate")


def test_a_label_that_only_looks_like_an_index(model_dir, tmp_path, capsys, no_training) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "0"}\n{"text": "b", "label": "\u00b2"}\n', encoding="utf-8")
    line = _one_line(_train(model_dir, path, tmp_path / "a", "--label-names", "x,y,z"), capsys)
    assert line == f"cpt train: error: {path}, line 2: label '\u00b2' is not an index 0..2 of --label-names ['x', 'y', 'z']"
