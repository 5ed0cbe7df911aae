"""The `cpt` command on a tiny model folder: the happy path, every option, and bad input."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
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
    capsys.readouterr()  # what the test printed before (a progress bar of save_pretrained) is not main's
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
    assert "the longest example" in line and "more than the model's 16" in line
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
    for command in (["demo"], ["train"], ["eval"], ["predict"], ["generate"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: cpt {command[0]}" in capsys.readouterr().out


def test_python_dash_m_cpt_runs_the_command() -> None:
    result = subprocess.run([sys.executable, "-m", "cpt", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: cpt" in result.stdout
    for name in ("demo", "train", "eval", "predict", "generate"):
        assert name in result.stdout


def test_train_never_uses_what_eval_scores(data_file: Path) -> None:
    # `cpt train --test n` and `cpt eval --test n` with the same data and seed: eval's examples are
    # drawn first, so the context and training examples come from the rest.
    from cpt.labelled_data import load_dataset, split_examples

    data = load_dataset(str(data_file))
    context, train, _ = split_examples(data, per_class=1, n_test=6, n_train=4, seed=0)
    _, _, scored = split_examples(data, per_class=0, n_test=6, seed=0)
    assert not {e.text for e in context + train} & {e.text for e in scored}


# --- options -------------------------------------------------------------------------------------


def _usage_error(argv: list[str], capsys) -> str:
    """A bad value that argparse catches: one line on stderr, exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _train(model_dir: Path, data_file: Path, output: Path, *extra: str) -> dict:
    argv = ["train", "--model", str(model_dir), "--data", str(data_file), "--per-class", "1", "--output",
            str(output), "--no-progress", "--device", "cpu", "--test", "6", "--lr", "1e-2", *extra]
    assert main(argv) == 0
    return argv


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_version(capsys) -> None:
    import importlib.metadata

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.strip()
    import cpt

    assert out == (f"cpt {cpt.__version__} (torch {importlib.metadata.version('torch')}, "
                   f"transformers {importlib.metadata.version('transformers')})")


def test_the_options_default_to_the_library_s_defaults() -> None:
    """The command line reads its defaults from the library, so the two cannot drift apart."""
    from cpt.cli import _parser
    from cpt.data import Template
    from cpt.infer import classify
    from cpt.train import TrainConfig
    from cpt.workflow import CONTEXT_DEFAULTS, DEFAULT_SELECTION

    args = _parser().parse_args(["train", "--data", "d", "--output", "o"])
    config, template = TrainConfig(), Template()
    assert (args.epochs, args.lr, args.batch_size, args.seed) == (
        config.epochs, config.learning_rate, config.batch_size, config.seed
    )
    assert (args.input_template, args.output_template, args.separator) == (
        template.input_template, template.output_template, template.intra_separator
    )
    assert {"opt_projection_epsilon": args.epsilon, "opt_projection_format_epsilon": args.format_epsilon,
            "opt_weighted_loss_type": args.loss, "opt_loss_decay_factor": args.decay} == CONTEXT_DEFAULTS
    assert args.selection == DEFAULT_SELECTION
    batch_size = inspect.signature(classify).parameters["batch_size"].default
    for command in (["eval", "--adapter", "a", "--data", "d"], ["predict", "--adapter", "a", "t"]):
        assert _parser().parse_args(command).batch_size == batch_size


def test_help_shows_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--epsilon EPSILON L2 radius of input rows (d = 2048) (default: 1.0)",
                  "(default: 0.001)", "(default: decay)", "--seed SEED seed of the draws and of training (default: 0)",
                  "(default: float32)", "(default: cpt)", "(default: ' ')"):
        assert shown in text, shown
    for command, shown in (("eval", "(default: 8)"), ("predict", "(default: 8)"), ("generate", "(default: 20)"),
                           ("demo", "(default: rotten_tomatoes)")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert shown in " ".join(capsys.readouterr().out.split())


def test_max_steps_and_peft_format(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    _train(model_dir, data_file, tmp_path / "peft", "--max-steps", "3", "--format", "peft")
    result = _last_json(capsys)
    assert result["steps"] == 3 and result["format"] == "peft"
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # PEFT's layout keeps no label set: predict needs --labels, eval takes the data's labels.
    line = _error(["predict", "--model", str(model_dir), "--adapter", str(tmp_path / "peft"), "--device", "cpu",
                   "--no-progress", "a fine story"], capsys)
    assert line == "cpt predict: error: the adapter records no label set (PEFT's layout): pass --labels"
    assert main(["predict", "--model", str(model_dir), "--adapter", str(tmp_path / "peft"), "--device", "cpu",
                 "--no-progress", "--labels", "negative,positive", "a fine story"]) == 0
    assert set(_last_json(capsys)["probabilities"]) == {"negative", "positive"}
    assert main(["eval", "--model", str(model_dir), "--adapter", str(tmp_path / "peft"), "--data", str(data_file),
                 "--test", "4", "--device", "cpu", "--no-progress"]) == 0
    assert _last_json(capsys)["examples"] == 4


def test_checkpoint_dir_and_resume_match_one_run(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    _train(model_dir, data_file, tmp_path / "whole", "--max-steps", "6")
    capsys.readouterr()
    checkpoints = tmp_path / "checkpoints"
    _train(model_dir, data_file, tmp_path / "first", "--max-steps", "4", "--checkpoint-dir", str(checkpoints),
           "--checkpoint-every", "2")
    assert (checkpoints / "last" / "trainer_state.json").is_file()
    _train(model_dir, data_file, tmp_path / "resumed", "--max-steps", "6", "--checkpoint-dir", str(checkpoints),
           "--resume")
    result = _last_json(capsys)
    assert result["steps"] == 6 and result["resumed_from"] == str(checkpoints / "last")
    whole = load_file(tmp_path / "whole" / "cpt_adapter.safetensors")
    resumed = load_file(tmp_path / "resumed" / "cpt_adapter.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key  # bit for bit: resume loses nothing


def test_resume_needs_a_checkpoint(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    base = ["train", "--model", str(model_dir), "--data", str(data_file), "--output", str(tmp_path / "o"), "--test", "6"]
    assert _error([*base, "--resume"], capsys) == "cpt train: error: --resume needs --checkpoint-dir"
    line = _error([*base, "--resume", "--checkpoint-dir", str(tmp_path / "empty")], capsys)
    assert line.startswith("cpt train: error: --resume: no checkpoint to resume in")
    assert _error([*base, "--checkpoint-every", "2"], capsys) == "cpt train: error: --checkpoint-every needs --checkpoint-dir"


def test_dtype_reaches_the_model(model_dir: Path, adapter: Path, monkeypatch, capsys) -> None:
    import cpt.pretrained

    seen = []
    real = cpt.pretrained.load_model_and_tokenizer

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        model, tokenizer = real(*args, **kwargs)
        seen.append(model.dtype)
        return model, tokenizer

    monkeypatch.setattr(cpt.pretrained, "load_model_and_tokenizer", spy)
    assert main(["predict", "--model", str(model_dir), "--adapter", str(adapter), "--device", "cpu",
                 "--dtype", "bfloat16", "--no-progress", "a fine story"]) == 0
    assert seen == [torch.bfloat16]
    assert _last_json(capsys)["label"] in ("negative", "positive")


def test_progress_bars_on_stderr_and_off(adapter: Path, model_dir: Path, data_file: Path, capsys) -> None:
    argv = ["eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(data_file),
            "--test", "6", "--device", "cpu", "--batch-size", "2"]
    assert main(argv) == 0
    shown = capsys.readouterr()
    assert "scoring" in shown.err and "6/6" in shown.err
    assert main([*argv, "--no-progress"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == ""
    assert json.loads(quiet.out)["accuracy"] == json.loads(shown.out)["accuracy"]
    assert main(["predict", "--model", str(model_dir), "--adapter", str(adapter), "--device", "cpu",
                 "a fine story", "an awful film", "the plot was thin"]) == 0
    assert "3/3" in capsys.readouterr().err


def test_predict_in_passes_keeps_the_texts_order(adapter: Path, model_dir: Path, capsys) -> None:
    texts = ["a", "an awful film and boring", "the plot", "a fine story"]
    outputs = []
    for batch in ("1", "8"):
        assert main(["predict", "--model", str(model_dir), "--adapter", str(adapter), "--device", "cpu",
                     "--no-progress", "--batch-size", batch, *texts]) == 0
        outputs.append([json.loads(line) for line in capsys.readouterr().out.strip().splitlines()])
    assert [line["text"] for line in outputs[0]] == texts
    for one, many in zip(*outputs):
        assert one["label"] == many["label"]
        for label in one["probabilities"]:
            assert one["probabilities"][label] == pytest.approx(many["probabilities"][label], abs=1e-5)


def test_generate_prints_one_line_per_text(adapter: Path, model_dir: Path, capsys) -> None:
    from cpt import CPTModel, load_model_and_tokenizer

    assert main(["generate", "--model", str(model_dir), "--adapter", str(adapter), "--device", "cpu",
                 "--max-new-tokens", "4", "--no-progress", "a fine story", "an awful film"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    base, tokenizer = load_model_and_tokenizer(model_dir)
    model = CPTModel.from_pretrained(base, adapter)
    expected = model.generate(tokenizer, ["a fine story", "an awful film"], max_new_tokens=4, do_sample=False)
    assert lines == [{"text": "a fine story", "generated": expected[0]},
                     {"text": "an awful film", "generated": expected[1]}]


def test_label_names_map_integer_labels(model_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "ints.jsonl"
    path.write_text("".join(json.dumps({"text": f"{t} {i}", "label": label}) + "\n"
                            for label, texts in enumerate(TEXTS.values()) for t in texts for i in range(2)))
    output = tmp_path / "a"
    _train(model_dir, path, output, "--label-names", "pos,neg", "--max-steps", "1")
    assert json.loads((output / "cpt_config.json").read_text())["task"]["labels"] == ["pos", "neg"]
    line = _error(["train", "--model", str(model_dir), "--data", str(path), "--output", str(tmp_path / "b"),
                   "--label-names", "only", "--test", "2"], capsys)
    first_of_label_1 = 2 * len(next(iter(TEXTS.values()))) + 1  # the file and line, not the example's index
    assert f"ints.jsonl, line {first_of_label_1}: label '1' is not an index 0..0 of --label-names ['only']" in line


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "d", "--output", "o", "--max-steps", "0"], "argument --max-steps: must be >= 1, got 0"),
    (["train", "--data", "d", "--output", "o", "--checkpoint-every", "x"], "argument --checkpoint-every: expected an integer, got 'x'"),
    (["predict", "--adapter", "a", "--dtype", "int8", "t"], "argument --dtype: invalid choice: 'int8'"),
    (["eval", "--adapter", "a", "--data", "d", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["predict", "--adapter", "a", "--labels", "a,a", "t"], "argument --labels: the list holds 'a' twice (at 0 and 1)"),
    (["generate", "--adapter", "a", "--max-new-tokens", "-1", "t"], "argument --max-new-tokens: must be >= 1, got -1"),
    (["train", "--data", "d", "--output", "o", "--format", "onnx"], "argument --format: invalid choice: 'onnx'"),
])
def test_bad_values_are_one_line(argv: list[str], message: str, capsys) -> None:
    line = _usage_error(argv, capsys)
    assert line.startswith(f"cpt {argv[0]}: error: {message}")


@pytest.mark.parametrize("value", ["-1", "1e-45", "1e-39", "3.5e38", "inf", "nan"])
def test_temperature_beyond_what_sampling_computes(adapter: Path, model_dir: Path, value: str, capsys) -> None:
    argv = ["generate", "--model", str(model_dir), "--adapter", str(adapter), "--temperature", value, "x"]
    line = _error(argv, capsys)
    assert line == ("cpt generate: error: --temperature must be 0 (greedy) or a number in "
                    f"[1.1754943508222875e-38, 3.4028234663852886e+38], got {float(value)}")


def test_temperature_at_the_ends_of_its_range(adapter: Path, model_dir: Path, capsys) -> None:
    argv = ["generate", "--model", str(model_dir), "--adapter", str(adapter), "--device", "cpu", "--no-progress",
            "--max-new-tokens", "3", "a fine story"]
    outputs = []
    for temperature in ("0", "1.1754943508222875e-38", "3.4028234663852886e+38"):
        assert main([*argv, "--temperature", temperature]) == 0
        outputs.append(_last_json(capsys)["generated"])
    assert outputs[1] == outputs[0]  # the coldest sampling is greedy


@pytest.mark.parametrize("command", [
    ["train", "--data", "d", "--output", "o"], ["demo"], ["eval", "--adapter", "a", "--data", "d"],
    ["generate", "--adapter", "a", "t"],
])
def test_seed_beyond_what_generators_take_names_the_option(command: list[str], capsys) -> None:
    assert _usage_error([*command, "--seed", str(2**64)], capsys) == (
        f"cpt {command[0]}: error: argument --seed: must be <= 2**64 - 1, got {2**64} (see cpt {command[0]} --help)"
    )
    assert _usage_error([*command, "--seed", "-1"], capsys).startswith(
        f"cpt {command[0]}: error: argument --seed: must be >= 0, got -1"
    )


@pytest.fixture(scope="module")
def broken_model_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model with NaN input embeddings for the bytes of "Ω" (only texts holding it turn
    NaN), and with every output weight infinite (every text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    folders = {}
    for name in ("omega", "all"):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            if name == "omega":
                model.get_input_embeddings().weight[tokenizer.encode("Ω", add_special_tokens=False)] = torch.nan
            else:
                model.lm_head.weight.mul_(torch.inf)
        folders[name] = tmp_path_factory.mktemp(f"broken-{name}")
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def test_non_finite_scores_are_refused_naming_the_text(
    broken_model_dirs: dict[str, Path], adapter: Path, data_file: Path, capsys
) -> None:
    omega = ["--model", str(broken_model_dirs["omega"]), "--adapter", str(adapter), "--device", "cpu", "--no-progress"]
    assert main(["predict", *omega, "a fine story"]) == 0  # a text without it scores
    assert sum(_last_json(capsys)["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    # longest first, one a pass: "boring Ω" is the first of its pass, and the second text given
    line = _error(["predict", *omega, "--batch-size", "1", "a fine story", "boring Ω"], capsys)
    assert line.startswith("cpt predict: error: text 1 ('boring Ω'): the model's label scores are NaN or infinite")
    line = _error(["generate", *omega, "--max-new-tokens", "2", "a fine story", "boring Ω"], capsys)
    assert line.startswith("cpt generate: error: text 1 ('boring Ω'): the model's next-token scores held NaN")
    line = _error(["eval", "--model", str(broken_model_dirs["all"]), "--adapter", str(adapter), "--data",
                   str(data_file), "--test", "6", "--device", "cpu", "--no-progress"], capsys)
    assert line.startswith("cpt eval: error: text ") and "label scores are NaN or infinite" in line


@pytest.mark.parametrize("argv", [
    ["demo", "--no-such-option"],
    ["train", "--data", "d", "--output", "o", "--no-such-option"],
    ["eval", "--adapter", "a", "--data", "d", "--no-such-option", "1"],
    ["predict", "--adapter", "a", "t", "--no-such-option"],
    ["generate", "--adapter", "a", "t", "--no-such-option"],
])
def test_a_subcommands_unknown_option_names_the_subcommand(argv: list[str], capsys) -> None:
    line = _usage_error(argv, capsys)
    assert line.startswith(f"cpt {argv[0]}: error: unrecognized arguments: --no-such-option")
    assert line.endswith(f"(see cpt {argv[0]} --help)")


@pytest.mark.parametrize("argv", [
    ["predict", "--adapter", "a", "t", "--labels", "x", "\r", "\n--fake"],
    ["train", "--data", "d", "--output", "o", "--epochs", "1\n2"],
    ["eval", "--adapter", "a", "--data", "d", "--dtype", "float\r\n32"],
])
def test_a_parser_error_with_line_breaks_in_the_input_is_one_line(argv: list[str], capsys) -> None:
    line = _usage_error(argv, capsys)
    assert line.startswith(f"cpt {argv[0]}: error: argument") or "unrecognized arguments: '\\r' '\\n--fake'" in line


def test_an_unknown_option_before_the_subcommand_is_the_top_parsers(capsys) -> None:
    line = _usage_error(["--no-such-option", "predict", "--adapter", "a", "t"], capsys)
    assert line.startswith("cpt: error: unrecognized arguments: --no-such-option")


def test_help_imports_neither_torch_nor_transformers() -> None:
    script = "import sys\nfrom cpt.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(("option", "expected"), [([], "leave-one-out"), (["--selection", "none"], None)])
def test_train_passes_the_selection_to_fit(
    option: list[str], expected: str | None, model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch
) -> None:
    import cpt.workflow

    real_fit, seen = cpt.workflow.fit, []

    def recording_fit(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs["selection"])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(cpt.workflow, "fit", recording_fit)
    status = main([
        "train", "--model", str(model_dir), "--data", str(data_file), "--per-class", "2", "--output",
        str(tmp_path / "a"), "--max-steps", "2", "--no-progress", "--device", "cpu", "--test", "4", *option,
    ])
    assert status == 0 and seen == [expected]


# ---------------------------------------------------------------------- resuming with leave-one-out

CONTEXT = [("the movie was great", "positive"), ("an awful film", "negative"), ("a fine story", "positive"),
           ("boring and too long", "negative"), ("the actors were good", "positive"), ("great", "positive")]


@pytest.fixture(scope="module")
def selection_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model, a context and mostly positive training data, on which leave-one-out keeps
    step 2's context of 8 (training helps it, then overshoots)."""
    root = tmp_path_factory.mktemp("selection")
    tokenizer = make_bpe_tokenizer()
    make_model("llama", vocab_size=len(tokenizer), seed=1).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "context.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in CONTEXT))
    records = [{"text": f"{t} {i}", "label": "positive"} for t in TEXTS["positive"] for i in range(4)]
    records += [{"text": "the plot was thin", "label": "negative"}, {"text": "an awful film 9", "label": "negative"}]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    other = [{**r, "text": r["text"].replace("the", "a")} for r in records]  # as many samples, other tokens
    (root / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))
    return {"model": root / "model", "context": root / "context.jsonl", "data": root / "data.jsonl",
            "other": root / "other.jsonl"}


def _selection_argv(run: dict[str, Path], output: Path, checkpoints: Path, data: str = "data") -> list[str]:
    return ["train", "--model", str(run["model"]), "--data", str(run[data]), "--context", str(run["context"]),
            "--train", "8", "--test", "2", "--lr", "1e-1", "--max-steps", "8", "--output", str(output),
            "--no-progress", "--device", "cpu", "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "3"]


def _interrupted(argv: list[str], monkeypatch) -> None:
    """Runs ``argv`` and stops it as Ctrl-C would at the third leave-one-out score (step 4: the
    last checkpoint is step 3's)."""
    import cpt.selection

    real, calls = cpt.selection.leave_one_out, []

    def interrupt_at_the_third(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(cpt.selection, "leave_one_out", interrupt_at_the_third)
        assert main(argv) == 130


def test_resume_with_leave_one_out_matches_one_run(selection_run, tmp_path: Path, monkeypatch, caplog) -> None:
    from safetensors.torch import load_file

    import logging

    cpt_logger = logging.getLogger("cpt")  # the command keeps cpt's records from the root logger
    cpt_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="cpt.workflow"):
            assert main(_selection_argv(selection_run, tmp_path / "whole", tmp_path / "whole-checkpoints")) == 0
    finally:
        cpt_logger.removeHandler(caplog.handler)
    assert "leave-one-out kept the context of step 2" in caplog.text  # before the interruption below
    argv = _selection_argv(selection_run, tmp_path / "resumed", tmp_path / "checkpoints")
    _interrupted(argv, monkeypatch)
    assert json.loads((tmp_path / "checkpoints" / "last" / "trainer_state.json").read_text())["step"] == 3
    assert main([*argv, "--resume"]) == 0
    whole = load_file(tmp_path / "whole" / "cpt_adapter.safetensors")
    resumed = load_file(tmp_path / "resumed" / "cpt_adapter.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key  # bit for bit, the selection's choice included


def test_resume_refuses_other_data_of_the_same_size(selection_run, tmp_path: Path, monkeypatch, capsys) -> None:
    _interrupted(_selection_argv(selection_run, tmp_path / "a", tmp_path / "checkpoints"), monkeypatch)
    line = _error([*_selection_argv(selection_run, tmp_path / "a", tmp_path / "checkpoints", "other"), "--resume"], capsys)
    assert line.startswith(f"cpt train: error: cannot resume from {tmp_path / 'checkpoints' / 'last'}: it was trained "
                           "on different training samples")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda meta: meta["optimizer"]["state"]["0"].pop("exp_avg"), "field 'optimizer.state.0.exp_avg' is missing"),
        (lambda meta: meta["selection"].update(best_call="2"), "field 'selection.best_call' must be null or an integer >= 0, got '2'"),
        (lambda meta: meta["config"].update(learning_rate=[]), "field 'config.learning_rate' must be a finite number >= 0, got []"),
    ],
)
def test_a_bad_checkpoint_field_is_one_line(selection_run, tmp_path: Path, monkeypatch, capsys, edit, message) -> None:
    from cpt import _io
    from cpt.checkpoint import _sha256

    argv = _selection_argv(selection_run, tmp_path / "a", tmp_path / "checkpoints")
    _interrupted(argv, monkeypatch)
    path = tmp_path / "checkpoints" / "last" / "trainer_state.json"
    meta = json.loads(path.read_text())
    edit(meta)
    meta.pop("state_sha256")
    meta["state_sha256"] = _sha256(_io.json_bytes(meta))
    path.write_text(json.dumps(meta))
    assert message in _error([*argv, "--resume"], capsys)


# --- stderr: errors, cpt's own warnings, and nothing else ----------------------------------------

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs gguf")


@needs_gguf
def test_no_progress_leaves_stderr_empty_with_a_gguf_model(
    adapter: Path, data_file: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from tiny_gguf import write_gguf

    monkeypatch.setenv("CPT_HOME", str(tmp_path / "home"))
    tokenizer = make_bpe_tokenizer()
    gguf = write_gguf(tmp_path / "tiny.gguf", make_model("llama", vocab_size=len(tokenizer)), tokenizer)
    capsys.readouterr()
    assert main(["train", "--model", str(gguf), "--data", str(data_file), "--per-class", "1", "--test", "6",
                 "--max-steps", "1", "--output", str(tmp_path / "a"), "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""  # the conversion ran here, and drew no bar


def test_a_text_longer_than_the_tokenizer_allows_is_one_error_line(adapter: Path, tmp_path: Path, capsys) -> None:
    short = tmp_path / "short-model"
    tokenizer = make_bpe_tokenizer()
    tokenizer.model_max_length = 64  # transformers notes longer texts on stderr; _check_fits says it
    make_model("llama", vocab_size=len(tokenizer)).save_pretrained(short)
    tokenizer.save_pretrained(short)
    result = subprocess.run(  # transformers logs to the stderr it found at import: a process of its own
        [sys.executable, "-m", "cpt", "predict", "--model", str(short), "--adapter", str(adapter), "--device", "cpu",
         "--no-progress", "word " * 600], capture_output=True, text=True,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("cpt predict: error: the longest example")


def test_weights_missing_from_the_model_are_one_warning_line(adapter: Path, model_dir: Path, tmp_path: Path,
                                                             capsys) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["predict", "--model", str(broken), "--adapter", str(adapter), "--device", "cpu", "--no-progress",
                 "a fine story"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"cpt predict: warning: model {str(broken)!r}: its files lack 1 weight(s), initialized at random, so its "
        "outputs mean nothing: model.layers.0.mlp.up_proj.weight"
    ]


def test_library_warnings_are_dropped_and_cpts_own_are_one_line(capsys) -> None:
    import logging

    from cpt.cli import _quiet_libraries
    from cpt.warning import CPTWarning

    with _quiet_libraries("cpt train"):
        warnings.warn("a kernel choice the user did not make", UserWarning)
        warnings.warn("a deprecated argument", FutureWarning)
        warnings.warn("CUDA graphs are off\n  for this pass", CPTWarning)
        logging.getLogger("cpt.train").warning("a log record\nof cpt")
        logging.getLogger("cpt.train").info("a note")
    assert capsys.readouterr().err.splitlines() == [
        "cpt train: warning: CUDA graphs are off for this pass",
        "cpt train: warning: a log record of cpt",
    ]


def test_main_leaves_the_libraries_as_it_found_them(adapter: Path, model_dir: Path, capsys) -> None:
    import logging

    from transformers.utils import logging as hf_logging

    filters, show, verbosity = list(warnings.filters), warnings.showwarning, hf_logging.get_verbosity()
    assert hf_logging.is_progress_bar_enabled()
    assert main(["predict", "--model", str(model_dir), "--adapter", str(adapter), "--device", "cpu",
                 "--no-progress", "a fine story"]) == 0
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == verbosity
    assert warnings.filters == filters and warnings.showwarning is show
    assert logging.getLogger("cpt").handlers == [] and logging.getLogger("cpt").propagate


# --- what the catch-all turns into one line, and what it leaves alone -----------------------------


def _predict(model_dir: Path, adapter: Path, *texts: str) -> list[str]:
    return ["predict", "--model", str(model_dir), "--adapter", str(adapter), "--device", "cpu", "--no-progress",
            *(texts or ("a fine story",))]


def test_a_bug_keeps_its_traceback(adapter: Path, model_dir: Path, monkeypatch, capsys) -> None:
    import cpt.workflow

    def buggy(model):  # type: ignore[no-untyped-def]
        return model.no_such_attribute

    monkeypatch.setattr(cpt.workflow, "template_of", buggy)
    with pytest.raises(AttributeError, match="no_such_attribute"):
        main(_predict(model_dir, adapter))
    assert capsys.readouterr().err == ""  # nothing claims it was the user's input


@pytest.mark.parametrize(
    "error", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory.\nTried to allocate 2 GiB")], ids=["host", "cuda"]
)
def test_running_out_of_memory_is_one_line(error: Exception, adapter: Path, model_dir: Path, monkeypatch,
                                           capsys) -> None:
    import cpt.infer

    @functools.wraps(cpt.infer.classify)  # its signature: the command line reads its defaults
    def too_big(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise error

    monkeypatch.setattr(cpt.infer, "classify", too_big)
    line = _error(_predict(model_dir, adapter), capsys)
    assert line.startswith("cpt predict: error: out of memory: ")
    assert line.endswith("MemoryError" if isinstance(error, MemoryError) else "Tried to allocate 2 GiB")


def test_a_reader_that_leaves_ends_the_command_quietly(adapter: Path, model_dir: Path) -> None:
    child = subprocess.Popen([sys.executable, "-m", "cpt", *_predict(model_dir, adapter, *["a fine story"] * 200)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # before the command prints anything: its first line meets a closed pipe
    stderr = child.stderr.read().decode()
    assert child.wait() == 141, stderr
    assert stderr == ""
