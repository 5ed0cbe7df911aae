"""A hostile battery over every subcommand: each bad value of each option, each broken path and
data file ends with exit status 2, exactly one line on stderr (``cpt <command>: error: ...``), no
traceback, and nothing written where the adapter would go.

Each case names its input in its id; a failure anywhere under the command (a library bound, a
reader, a check that comes too late) fails the case.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import adapter, data_file, model_dir  # noqa: F401 - the tiny model, its data and adapter

import cpt.workflow
from cpt.cli import main

COMMANDS = ("demo", "train", "eval", "predict", "generate")
TRAINING = ("demo", "train")


@dataclass(frozen=True)
class Paths:
    model: Path
    data: Path
    adapter: Path
    work: Path  # an empty folder of the test's own: the working folder, and where bad files go

    @property
    def output(self) -> Path:
        return self.work / "out"


def _base(command: str, p: Paths) -> list[str]:
    """A command line that succeeds; each case appends what makes it fail (the last value wins)."""
    model = ["--model", str(p.model), "--device", "cpu", "--no-progress"]
    if command in TRAINING:
        return [command, *model, "--data", str(p.data), "--per-class", "1", "--test", "2", "--max-steps", "1",
                "--output", str(p.output)]
    if command == "eval":
        return [command, *model, "--adapter", str(p.adapter), "--data", str(p.data), "--test", "2"]
    extra = ["--max-new-tokens", "2"] if command == "generate" else []
    return [command, *model, "--adapter", str(p.adapter), *extra, "a fine story"]


@pytest.fixture
def paths(model_dir: Path, data_file: Path, adapter: Path, tmp_path: Path, monkeypatch) -> Paths:  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # `--output .` and relative paths land here, never in the repository
    monkeypatch.setenv("CPT_HOME", str(tmp_path / "home"))  # a .gguf file converts in here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub name fails at once
    return Paths(model_dir, data_file, adapter, work)


def _refused(argv: list[str], paths: Paths, capsys) -> str:
    """Runs ``argv``; asserts one error line, exit 2, and no adapter (whole or partial) written."""
    before = sorted(os.listdir(paths.work))
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exit_:  # the parser's own refusals
        status = exit_.code
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"cpt {argv[0]}: error: "), lines[0]
    assert not paths.output.exists() and sorted(os.listdir(paths.work)) == before  # nothing half-written
    return lines[0]


def test_every_base_command_line_succeeds(paths: Paths, capsys) -> None:
    for command in COMMANDS:  # so that each refusal below comes from the hostile value alone
        assert main(_base(command, paths)) == 0, capsys.readouterr().err
        assert capsys.readouterr().err == ""
        if paths.output.exists():
            import shutil

            shutil.rmtree(paths.output)


# --- option values -------------------------------------------------------------------------------

_COUNTS = ["x", "", "1.5", "-1", "1e3"]
_NUMBERS = ["x", "", "nan", "inf", "-inf", "-1"]
_SEEDS = ["x", "", "1.5"]
OPTIONS: list[tuple[str, tuple[str, ...], list[str]]] = [
    # (option, the commands that take it, bad values); @name is a path made by `_bad_path`
    ("--no-such-option", COMMANDS, ["1"]),
    ("--model", COMMANDS, ["@missing", "@dangling", "", "@folder", "@data", "@garbage_gguf", "org/no-such-model-here"]),
    ("--device", COMMANDS, ["foo", "", "meta", "cuda:99", "cpu:x"]),
    ("--dtype", COMMANDS, ["int8", "", "float"]),
    ("--per-class", TRAINING, [*_COUNTS, "100"]),
    ("--test", ("demo", "eval"), [*_COUNTS, "0", "100000"]),
    ("--test", ("train",), [*_COUNTS, "100000"]),
    ("--train", ("train",), [*_COUNTS, "100000"]),
    ("--epochs", TRAINING, [*_COUNTS, "0"]),
    ("--max-steps", TRAINING, [*_COUNTS, "0"]),
    ("--lr", TRAINING, [*_NUMBERS, "0", "1e39", "3e38"]),
    ("--batch-size", ("demo", "train", "eval", "predict"), [*_COUNTS, "0"]),
    ("--seed", TRAINING, [*_SEEDS, "-1", str(2**64)]),
    ("--seed", ("eval", "generate"), _SEEDS),
    ("--format", TRAINING, ["onnx", ""]),
    ("--selection", TRAINING, ["best", ""]),
    ("--label-names", ("demo", "train", "eval"), ["", ",", "a,a", "negative,positive"]),
    ("--epsilon", ("train",), _NUMBERS),
    ("--format-epsilon", ("train",), _NUMBERS),
    ("--decay", ("train",), [*_NUMBERS, "0", "2"]),
    ("--loss", ("train",), ["mean", ""]),
    ("--input-template", ("train",), ["no slot", "{}{}", "", "{0}"]),
    ("--output-template", ("train",), ["no slot", "{}{}", ""]),
    ("--checkpoint-every", ("train",), ["x", "0", "2"]),
    ("--checkpoint-dir", ("train",), ["@data", ""]),
    ("--context", ("train",), ["@missing", "@dangling", "@under_data", "", "@folder", "@empty", "@malformed"]),
    ("--data", ("demo", "train", "eval"),
     ["@missing", "@dangling", "@under_data", "", "@folder", "@empty", "@malformed", "no_such_set"]),
    ("--output", TRAINING, ["@data", "@under_data", "@loop", "@fifo"]),  # a dangling link is written where it points
    ("--checkpoint-dir", ("train",), ["@loop", "@fifo"]),
    ("--adapter", ("eval", "predict", "generate"),
     ["@missing", "@dangling", "", "@data", "@folder", "@foreign_adapter"]),
    ("--labels", ("predict",), ["", ",", "a,a", "positive"]),  # one label: it would win with probability 1
    ("--max-new-tokens", ("generate",), [*_COUNTS, "0"]),
    ("--temperature", ("generate",), [*_NUMBERS, "1e-45"]),
]


def _bad_path(name: str, p: Paths) -> str:
    """The path an ``@name`` placeholder stands for, made beside the working folder where needed."""
    bad = p.work.parent / "bad"
    bad.mkdir(exist_ok=True)
    if name == "missing":
        return str(bad / "missing.jsonl")
    if name == "folder":  # a folder where a file is expected, or an empty folder for a model
        return str(bad)
    if name == "data":  # a file where a folder is expected
        return str(p.data)
    if name == "under_data":  # a path through a file
        return str(p.data / "adapter")
    if name == "dangling":
        link = bad / "dangling"
        if not link.is_symlink():
            link.symlink_to(bad / "nowhere")
        return str(link)
    if name == "loop":  # a link to itself
        link = bad / "loop"
        if not link.is_symlink():
            link.symlink_to(link)
        return str(link)
    if name == "fifo":
        fifo = bad / "fifo"
        if not fifo.exists():
            os.mkfifo(fifo)
        return str(fifo)
    if name == "empty":
        (bad / "empty.jsonl").write_text("")
        return str(bad / "empty.jsonl")
    if name == "malformed":
        (bad / "malformed.jsonl").write_text('{"text": "a fine story", "label": "positive"}\n{"text": "oops", \n')
        return str(bad / "malformed.jsonl")
    if name == "garbage_gguf":
        (bad / "garbage.gguf").write_bytes(b"GGUF and then nothing")
        return str(bad / "garbage.gguf")
    if name == "foreign_adapter":
        (bad / "foreign").mkdir(exist_ok=True)
        (bad / "foreign" / "cpt_config.json").write_text("{not json")
        return str(bad / "foreign")
    raise AssertionError(name)


def _cases() -> list:
    return [
        pytest.param(command, option, value, id=f"{command} {option} {value!r}")
        for option, commands, values in OPTIONS for command in commands for value in values
    ]


@pytest.mark.parametrize(("command", "option", "value"), _cases())
def test_a_bad_option_value_is_one_line(command: str, option: str, value: str, paths: Paths, capsys) -> None:
    if value.startswith("@"):
        value = _bad_path(value[1:], paths)
    _refused([*_base(command, paths), option, value], paths, capsys)


REQUIRED = {"train": ["--data", "--output"], "eval": ["--adapter", "--data"], "predict": ["--adapter", "texts"],
            "generate": ["--adapter", "texts"]}


@pytest.mark.parametrize(("command", "missing"), [(c, m) for c, names in REQUIRED.items() for m in names])
def test_a_missing_required_argument_is_one_line(command: str, missing: str, paths: Paths, capsys) -> None:
    argv = _base(command, paths)
    if missing == "texts":
        argv = argv[:-1]
    else:
        at = argv.index(missing)
        argv = argv[:at] + argv[at + 2:]
    line = _refused(argv, paths, capsys)
    assert "the following arguments are required" in line


# --- data files ----------------------------------------------------------------------------------

BAD_ROWS: dict[str, tuple[str, bytes | None]] = {
    # name: (suffix, the bad line added to the valid data; None: the whole file is this line)
    "not JSON": (".jsonl", b"text,label"),
    "a JSON list": (".jsonl", b'["a fine story", "positive"]'),
    "no label key": (".jsonl", b'{"text": "a new story"}'),
    "no text key": (".jsonl", b'{"label": "positive"}'),
    "a text that is a number": (".jsonl", b'{"text": 3, "label": "positive"}'),
    "a null label": (".jsonl", b'{"text": "a new story", "label": null}'),
    "a nested label": (".jsonl", b'{"text": "a new story", "label": {"a": 1}}'),
    "non-UTF-8 bytes": (".jsonl", b'{"text": "caf\xe9", "label": "positive"}'),
    "a lone surrogate": (".jsonl", b'{"text": "a \\ud800 story", "label": "positive"}'),
    "a NaN label": (".jsonl", b'{"text": "a new story", "label": NaN}'),
    "a huge number label": (".jsonl", b'{"text": "a new story", "label": 1e400}'),
    "a CSV without a label column": (".csv", None),  # the whole file: a header without label
    "a .txt file": (".txt", b"a fine story\tpositive"),
    "a binary file": (".jsonl", bytes(range(256))),
    "one label only": (".jsonl", None),  # the whole file: every example labelled alike
}

def _data_cases() -> list:
    return [pytest.param(command, name, id=f"{command} {name}") for name in BAD_ROWS for command in ("demo", "train", "eval")
            if not (command == "eval" and name == "one label only")]  # eval scores with the adapter's label set


@pytest.mark.parametrize(("command", "name"), _data_cases())
def test_a_malformed_data_file_is_one_line(command: str, name: str, paths: Paths, capsys) -> None:
    suffix, bad = BAD_ROWS[name]
    path = paths.work.parent / f"data{suffix}"
    if suffix == ".csv":
        path.write_bytes(b"text,other\na fine story,positive\nan awful film,negative\n")
    elif bad is None:
        path.write_text("".join(line.replace("negative", "positive") + "\n" for line in paths.data.read_text().splitlines()))
    else:  # one bad line among good ones: the bad line alone must be the reason
        path.write_bytes(paths.data.read_bytes() + bad + b"\n")
    _refused([*_base(command, paths), "--data", str(path)], paths, capsys)


# --- generated values ----------------------------------------------------------------------------

INTEGER_OPTIONS = {  # option: (a command that takes it, its smallest value)
    "--per-class": ("train", 0), "--train": ("train", 0), "--test": ("eval", 1), "--max-steps": ("train", 1),
    "--batch-size": ("predict", 1), "--checkpoint-every": ("train", 1), "--max-new-tokens": ("generate", 1),
}


def _parses_as(kind: type, text: str) -> bool:
    """Whether ``kind(text)`` (int or float) reads ``text`` as a number."""
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _not_an_integer(text: str) -> bool:
    return not _parses_as(int, text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    option=st.sampled_from(sorted(INTEGER_OPTIONS)),
    value=st.one_of(st.text().filter(_not_an_integer), st.integers(max_value=-1).map(str), st.floats().map(repr)),
)
def test_any_bad_integer_is_refused_by_the_parser(option: str, value: str, paths: Paths, capsys) -> None:
    command, smallest = INTEGER_OPTIONS[option]
    if not _not_an_integer(value) and int(value) >= smallest:
        return
    line = _refused([*_base(command, paths), f"{option}={value}"], paths, capsys)
    assert line.startswith(f"cpt {command}: error: argument {option}: ")


_FLOAT32_MAX = torch.finfo(torch.float32).max


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(TRAINING),
    lr=st.one_of(st.floats(max_value=0.0), st.floats(min_value=_FLOAT32_MAX * 1.0001), st.just(float("nan"))),
)
def test_any_learning_rate_float32_cannot_hold_is_refused_before_loading(
    command: str, lr: float, paths: Paths, capsys, monkeypatch
) -> None:
    line = _refused([*_base(command, paths), f"--lr={lr!r}"], paths, capsys)
    assert "--lr" in line


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(temperature=st.one_of(st.floats(max_value=-1e-300), st.just(float("nan")), st.text().filter(
    lambda t: not _parses_as(float, t))))
def test_any_bad_temperature_is_refused(temperature: float | str, paths: Paths, capsys) -> None:
    _refused([*_base("generate", paths), f"--temperature={temperature}"], paths, capsys)


# --- checked before any training ------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch) -> None:
    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("training started")

    monkeypatch.setattr(cpt.workflow, "fit", fail)


@pytest.mark.parametrize("command", TRAINING)
@pytest.mark.parametrize("output", ["", "."])
def test_an_output_that_cannot_be_an_adapter_is_refused_before_training(
    command: str, output: str, paths: Paths, capsys, no_training
) -> None:
    _refused([*_base(command, paths), "--output", output], paths, capsys)


def test_a_checkpoint_folder_that_is_a_file_is_refused(paths: Paths, capsys) -> None:
    _refused([*_base("train", paths), "--checkpoint-dir", str(paths.data), "--checkpoint-every", "1"], paths, capsys)


@pytest.mark.parametrize("checkpoint", ["missing", "empty"])
def test_resume_without_a_checkpoint_is_refused(checkpoint: str, paths: Paths, capsys, no_training) -> None:
    folder = paths.work.parent / "checkpoints"
    if checkpoint == "empty":
        folder.mkdir()
    _refused([*_base("train", paths), "--checkpoint-dir", str(folder), "--resume"], paths, capsys)


# --- texts and labels from the command line ------------------------------------------------------

NOT_UNICODE = "a\udcffb"  # what Python makes of the byte 0xff in an argument (surrogateescape)


@pytest.mark.parametrize("command", ["predict", "generate"])
def test_a_text_that_is_not_unicode_is_one_line(command: str, paths: Paths, capsys) -> None:
    _refused([*_base(command, paths)[:-1], NOT_UNICODE], paths, capsys)


def test_a_label_that_is_not_unicode_is_one_line(paths: Paths, capsys) -> None:
    _refused([*_base("predict", paths), "--labels", f"{NOT_UNICODE},negative"], paths, capsys)


def _asks_for_help(token: str) -> bool:
    return len(token) > 2 and ("--help".startswith(token) or "--version".startswith(token)) or token == "-h"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.lists(
    st.one_of(st.sampled_from(["--batch-size", "--labels", "--dtype", "--device", "--calibrate", "--model", "-"]),
              st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)),
    max_size=4,
).filter(lambda tokens: not any(_asks_for_help(t) for t in tokens)))
def test_any_extra_arguments_give_a_result_or_one_line(extra: list[str], paths: Paths, capsys) -> None:
    argv = [*_base("predict", paths), *extra]
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    if status == 0:
        assert captured.err == "" and captured.out
    else:
        assert status == 2 and len(captured.err.splitlines()) == 1, captured.err
        assert captured.err.startswith("cpt predict: error: ")


# --- broken adapters and checkpoints ---------------------------------------------------------------


def _spoil_adapter(adapter: Path, to: Path, how: str) -> Path:
    import shutil

    shutil.copytree(adapter, to)
    weights, config = to / "cpt_adapter.safetensors", to / "cpt_config.json"
    fields = json.loads(config.read_text())
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "no weights":
        weights.unlink()
    elif how == "empty config":
        config.write_text("")
    elif how == "token ids outside the vocabulary":
        fields["config"]["cpt_token_ids"] = [10**9] * len(fields["config"]["cpt_token_ids"])
        config.write_text(json.dumps(fields))
    elif how == "too few token ids":
        fields["config"]["cpt_token_ids"] = fields["config"]["cpt_token_ids"][:-1]
        config.write_text(json.dumps(fields))
    elif how == "a key given twice":  # json.loads keeps the last labels: here, the two swapped
        text = json.dumps(fields)
        config.write_text(text[:-1] + ', "task": {"labels": ["positive", "negative"]}}')
    elif how == "PEFT's config beside cpt's":  # two adapters in one folder: cpt and PEFT would differ
        (to / "adapter_config.json").write_text(json.dumps(fields["config"]))
    elif how == "a null template":  # read as the default template, so the command succeeds
        fields["task"]["template"] = None
        config.write_text(json.dumps(fields))
    elif how == "attach_space of the wrong type":
        fields["task"]["template"]["attach_space"] = "no"
        config.write_text(json.dumps(fields))
    return to


@pytest.mark.parametrize("command", ["eval", "predict", "generate"])
@pytest.mark.parametrize("how", [
    "truncated weights", "no weights", "empty config", "token ids outside the vocabulary", "too few token ids",
    "attach_space of the wrong type", "a key given twice", "PEFT's config beside cpt's",
])
def test_a_broken_adapter_is_one_line(command: str, how: str, paths: Paths, capsys) -> None:
    spoiled = _spoil_adapter(paths.adapter, paths.work.parent / "spoiled", how)
    argv = _base(command, paths)
    at = argv.index("--adapter")
    argv[at + 1] = str(spoiled)
    _refused(argv, paths, capsys)


@pytest.mark.parametrize("how", [
    "empty trainer state",
    "no trainer state",
    "other data of the same size",  # refused here because the context differs too
])
def test_a_checkpoint_that_does_not_fit_is_one_line(how: str, paths: Paths, capsys) -> None:
    checkpoints = paths.work.parent / "checkpoints"
    first = [*_base("train", paths), "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "1"]
    first[first.index("--output") + 1] = str(paths.work.parent / "first")
    assert main(first) == 0
    state = checkpoints / "last" / "trainer_state.json"
    data = paths.data
    if how == "empty trainer state":
        state.write_text("")
    elif how == "no trainer state":
        state.unlink()
    else:  # the same number of examples and labels, other texts
        data = paths.work.parent / "other.jsonl"
        data.write_text("".join(line.replace('"text": "', '"text": "not ') + "\n"
                                for line in paths.data.read_text().splitlines()))
    argv = [*_base("train", paths), "--max-steps", "2", "--checkpoint-dir", str(checkpoints), "--resume",
            "--data", str(data)]
    _refused(argv, paths, capsys)


@pytest.mark.parametrize("command", ["eval", "predict", "generate"])
def test_an_adapter_with_a_null_template_runs_with_the_default_one(command: str, paths: Paths, capsys) -> None:
    spoiled = _spoil_adapter(paths.adapter, paths.work.parent / "spoiled", "a null template")
    argv = _base(command, paths)  # the adapter was trained with the default template: same output
    capsys.readouterr()
    assert main(argv) == 0
    expected = capsys.readouterr().out
    argv[argv.index("--adapter") + 1] = str(spoiled)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and _without_seconds(captured.out) == _without_seconds(expected)


def _without_seconds(out: str) -> list[dict]:
    rows = [json.loads(line) for line in out.splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


# --- signals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "status", "word"), [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_signal_during_training_ends_with_one_line_and_a_whole_checkpoint(
    name: str, status: int, word: str, paths: Paths
) -> None:
    import signal
    import subprocess
    import sys
    import time

    checkpoints = paths.work.parent / "checkpoints"
    argv = [*_base("train", paths), "--max-steps", "100000", "--checkpoint-dir", str(checkpoints),
            "--checkpoint-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(cpt.workflow.__file__).parents[1])}  # the cpt under test
    process = subprocess.Popen([sys.executable, "-m", "cpt", *argv], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (checkpoints / "last").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a few more saves: the signal lands anywhere, a save included
        process.send_signal(getattr(signal, name))
        err = process.communicate(timeout=120)[1]
    finally:
        process.kill()
    assert process.returncode == status and err == f"cpt train: {word}\n", (process.returncode, err)
    assert os.listdir(checkpoints) == ["last"]  # no temporary folder left
    step = json.loads((checkpoints / "last" / "trainer_state.json").read_text())["step"]
    assert main([*argv, "--max-steps", str(step + 1), "--resume"]) == 0  # the checkpoint is whole
