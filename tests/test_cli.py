"""The `cpt` command on a tiny model folder: the happy path and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_model
from tokenizers_util import make_bpe_tokenizer

from cpt.cli import main

TEXTS = {
    "positive": ["the movie was great", "a fine story", "the actors were good"],
    "negative": ["an awful film", "boring and too long", "the plot was thin"],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_bpe_tokenizer()
    make_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    lines = [
        json.dumps({"text": f"{t} {i}", "label": label})  # distinct texts: loaders drop duplicates
        for label, texts in TEXTS.items() for t in texts for i in range(4)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def adapter(model_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "adapter"
    status = main([
        "train", "--model", str(model_dir), "--data", str(data_file), "--per-class", "1",
        "--output", str(output), "--epochs", "2", "--no-progress", "--device", "cpu", "--test", "6",
    ])
    assert status == 0
    return output


def test_train_writes_an_adapter_with_its_task(adapter: Path, capsys) -> None:
    config = json.loads((adapter / "cpt_config.json").read_text())
    assert config["task"]["labels"] == ["negative", "positive"]
    assert config["task"]["template"]["input_template"] == "input: {}"
    assert not [p for p in adapter.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_eval_prints_accuracy(adapter: Path, model_dir: Path, data_file: Path, capsys) -> None:
    status = main(["eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(data_file),
                   "--test", "6", "--device", "cpu"])
    assert status == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["examples"] == 6 and 0.0 <= result["accuracy"] <= 1.0


def test_eval_prints_macro_f1_and_calibrates_on_request(adapter: Path, model_dir: Path, data_file: Path, capsys) -> None:
    args = ["eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(data_file), "--test", "6",
            "--device", "cpu"]
    results = []
    for extra in ([], ["--calibrate"]):
        assert main(args + extra) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    plain, calibrated = results
    assert (plain["calibrated"], calibrated["calibrated"]) == (False, True)
    for result in results:
        assert 0.0 <= result["macro_f1"] <= 1.0 and result["examples"] == 6


def test_predict_calibrated_probabilities_sum_to_one(adapter: Path, model_dir: Path, capsys) -> None:
    status = main(["predict", "--model", str(model_dir), "--adapter", str(adapter), "--device", "cpu",
                   "--calibrate", "a fine story"])
    assert status == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_predict_prints_one_line_per_text(adapter: Path, model_dir: Path, capsys) -> None:
    status = main(["predict", "--model", str(model_dir), "--adapter", str(adapter), "--device", "cpu",
                   "a fine story", "an awful film"])
    assert status == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["text"] for line in lines] == ["a fine story", "an awful film"]
    for line in lines:
        assert line["label"] in ("negative", "positive")
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def _error(argv: list[str], capsys) -> str:
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one line, no traceback
    assert "Traceback" not in captured.err
    return lines[0]


def test_missing_data_file(model_dir: Path, tmp_path: Path, capsys) -> None:
    line = _error(["train", "--model", str(model_dir), "--data", str(tmp_path / "none.jsonl"),
                   "--output", str(tmp_path / "out")], capsys)
    assert "none.jsonl" in line
    assert not (tmp_path / "out").exists()


def test_malformed_jsonl_line_is_named(model_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a fine story", "label": "positive"}\n{"text": "oops", \n')
    line = _error(["train", "--model", str(model_dir), "--data", str(path), "--output", str(tmp_path / "o")],
                  capsys)
    assert "line 2" in line


def test_label_outside_the_adapters_label_set(adapter: Path, model_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "other.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n"
                            for t, l in [("a fine story", "positive"), ("the plot was thin", "neutral")]))
    line = _error(["eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(path),
                   "--test", "2"], capsys)
    assert "['neutral']" in line and "label set" in line


def test_context_longer_than_the_model(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    short = tmp_path / "short-model"
    tokenizer = make_bpe_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer))
    model.config.max_position_embeddings = 16
    model.save_pretrained(short)
    tokenizer.save_pretrained(short)
    line = _error(["train", "--model", str(short), "--data", str(data_file), "--output", str(tmp_path / "o"),
                   "--test", "6"],
                  capsys)
    assert "maximum length of 16 tokens" in line
    assert not (tmp_path / "o").exists()


def test_unknown_model_path(data_file: Path, tmp_path: Path, capsys) -> None:
    line = _error(["train", "--model", str(tmp_path / "no-such-model"), "--data", str(data_file),
                   "--output", str(tmp_path / "o"), "--test", "6"], capsys)
    assert "cannot load model" in line


def test_missing_adapter_folder(model_dir: Path, tmp_path: Path, capsys) -> None:
    line = _error(["predict", "--model", str(model_dir), "--adapter", str(tmp_path / "nope"), "hello"], capsys)
    assert "no adapter folder" in line


def test_bad_option_value(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    line = _error(["train", "--model", str(model_dir), "--data", str(data_file), "--output", str(tmp_path / "o"),
                   "--epsilon", "-1", "--test", "6"], capsys)
    assert "opt_projection_epsilon" in line


def test_every_command_has_help(capsys) -> None:
    for command in (["demo"], ["train"], ["eval"], ["predict"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: cpt {command[0]}" in capsys.readouterr().out


def test_python_dash_m_cpt_runs_the_command() -> None:
    result = subprocess.run([sys.executable, "-m", "cpt", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: cpt" in result.stdout
    for name in ("demo", "train", "eval", "predict"):
        assert name in result.stdout


def test_train_never_uses_what_eval_scores(data_file: Path) -> None:
    # `cpt train --test n` and `cpt eval --test n` with the same data and seed: eval's examples are
    # drawn first, so the context and training examples come from the rest.
    from cpt.datasets import load_dataset, split_examples

    data = load_dataset(str(data_file))
    context, train, _ = split_examples(data, per_class=1, n_test=6, n_train=4, seed=0)
    _, _, scored = split_examples(data, per_class=0, n_test=6, seed=0)
    assert not {e.text for e in context + train} & {e.text for e in scored}
