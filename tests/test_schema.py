"""cpt.schema: each kind on its own, nesting and the field path in the message; then the declared
schemas of an adapter's cpt_config.json and a checkpoint's trainer_state.json, every field of a
real save replaced by a value of every wrong JSON type."""

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from contexts import moved_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpt import CPTModel, _io
from cpt._fields import show
from cpt.adapter import CPT_CONFIG_NAME, TASK_SCHEMA, read_adapter, write_adapter
from cpt.checkpoint import (
    STATE_JSON_NAME,
    Selection,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from cpt.schema import (
    ANY, BOOL, NULL, SHA256_HEX, Built, Choice, Either, Hex, Int, Items, Nullable, Number, Record, Text, Tuple,
    check_header, field_path, validate,
)
from cpt.train import TrainConfig, make_optimizer

WHERE = Path("/data/file.json")


def refusal(value, kind, path: str = "") -> str:
    with pytest.raises(ValueError) as error:
        validate(value, kind, WHERE, path)
    return str(error.value)


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        (Int(), [0, -5, 10**30], [True, 1.0, "1", None, [1]]),
        (Int(min=1), [1, 7], [0, -1, False]),
        (Int(0, 3), [0, 3], [-1, 4]),
        (Number(), [0, 1.5, -2, 10**300], [math.nan, math.inf, -math.inf, 10**400, True, "1", None]),
        (Number(min=0, below=1), [0, 0.999], [-0.1, 1, 1.5]),
        (Text(), ["", "é"], ["\ud800", 1, None, b"x"]),
        (Text(non_empty=True), ["a"], [""]),
        (Hex(4), ["00af"], ["00AF", "00a", "00afe", "xyzw", 1234]),
        (Choice("cpt"), ["cpt"], ["CPT", None]),
        (BOOL, [True, False], [1, 0, "true", None]),
        (Choice(1), [1], [True, 1.0]),
        (NULL, [None], [0, False, ""]),
        (Nullable(Int(min=0)), [None, 3], [-1, "3", False]),
        (Either(Number(), Choice("nan")), [1.5, "nan"], ["NaN", None]),
        (Items(Int()), [[], [1, 2]], [[1, "2"], "12", {"0": 1}, (1, 2)]),
        (Items(Text(), non_empty=True, unique=True), [["a", "b"]], [[], ["a", "a"], ["a", 1]]),
        (Tuple(Int(), Text()), [[1, "a"]], [[1], [1, "a", 2], ["a", 1]]),
        (Record({"a": Int()}), [{"a": 1}], [{}, {"a": 1, "b": 2}, {"a": "1"}, [("a", 1)]]),
        (Record({"a": Int()}, optional=frozenset({"a"})), [{}, {"a": 1}], [{"a": None}]),
        (Record({}, extra=Int()), [{}, {"x": 1, "y": 2}], [{"x": "1"}]),
        (ANY, [None, [], {}, "x", 1.5], []),
    ],
)
def test_each_kind_takes_its_values_and_refuses_the_rest(kind, good, bad) -> None:
    for value in good:
        validate(value, kind, WHERE)
    for value in bad:
        assert refusal(value, kind, "f").startswith(f"{WHERE}: field 'f")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"task": {"labels": ["a", "b", 3]}}, "field 'task.labels[2]' must be a non-empty string, got 3"),
        ({"task": {"labels": ["a", "a"]}}, "field 'task.labels' holds 'a' twice"),
        ({"task": {"labels": []}}, "field 'task.labels' must be a non-empty list, got []"),
        ({"task": {"labels": ["a"], "extra": 1}}, "field 'task' has unknown keys ['extra']"),
        ({"task": {}, "sums": {"a/b.json": 5}}, "field 'sums[\"a/b.json\"]' must be 64 hex digits, got 5"),
        ({"task": {}, "rows": [[1, 2], [3, True]]}, "field 'rows[1][1]' must be an integer >= 0, got True"),
        ({"task": {}, "rows": [[1, 2], [3]]}, "field 'rows[1]' must be a list of 2, got [3]"),
        ({"task": 5}, "field 'task' must be null or an object, got 5"),
        ({}, "field 'task' is missing"),
        ({"task": {}, "score": "NaN"}, "field 'score' must be a finite number or \"-inf\", got 'NaN'"),
        ({"task": {}, "score": 10**400}, f"field 'score' must be a finite number or \"-inf\", got {show(10**400)}"),
        ({"task": {}, "built": {"n": -1}}, "field 'built': n must be >= 0"),
        ({"task": {}, "built": {"m": 1}}, "field 'built' has unknown keys ['m']"),
    ],
)
def test_the_message_names_the_file_and_the_field_path(value, message) -> None:
    def build(fields: dict) -> None:
        if fields.get("n", 0) < 0:
            raise ValueError("n must be >= 0")

    kind = Record(
        {
            "task": Nullable(TASK_SCHEMA),
            "sums": Record({"a/b.json": SHA256_HEX}),
            "rows": Items(Tuple(Int(min=0), Int(min=0))),
            "score": Either(Number(), Choice("-inf")),
            "built": Built(build, Record({"n": ANY}, optional=frozenset({"n"}))),
        },
        optional=frozenset({"sums", "rows", "score", "built"}),
    )
    assert refusal(value, kind) == f"{WHERE}: {message}"


def test_a_whole_file_of_the_wrong_kind_is_named_without_a_field() -> None:
    assert refusal([1], Record({})) == f"{WHERE} must be an object, got [1]"


def test_field_paths() -> None:
    assert field_path("", "step") == "step"
    assert field_path("optimizer.state", "0") == "optimizer.state.0"
    assert field_path("losses", 3) == "losses[3]"
    assert field_path("files_sha256", "adapter/cpt_config.json") == 'files_sha256["adapter/cpt_config.json"]'


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"format": "cpt", "format_version": 1}, None),
        ({"format": "peft", "format_version": 1}, "field 'format' must be \"cpt\", got 'peft'"),
        ({"format": "cpt", "format_version": True}, "field 'format_version' must be an integer >= 1, got True"),
        ({"format": "cpt"}, "field 'format_version' is missing"),
        ({"format": "cpt", "format_version": 3}, "was written by a newer cpt (format version 3); upgrade cpt"),
    ],
)
def test_check_header(meta, message) -> None:
    if message is None:
        assert check_header(meta, WHERE, "cpt", 2) == 1
        return
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_header(meta, WHERE, "cpt", 2)


def test_the_validator_follows_the_schema_not_the_value() -> None:
    """A deeply nested value under a field of any kind is no harder than a flat one."""
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    validate({"a": deep}, Record({}, extra=ANY), WHERE)
    assert refusal({"a": deep}, Record({"a": Int()})) == f"{WHERE}: field 'a' must be an integer, got a list nested too deep to print"


# ---------------------------------------------------------------------- the declared files, every field

WRONG = {
    type(None): st.none(),
    bool: st.booleans(),
    int: st.integers(-(2**70), 2**70),
    float: st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),
    str: st.text(max_size=8).filter(lambda t: t not in ("nan", "inf", "-inf")),
    list: st.lists(st.integers(-2, 3), max_size=3),
    dict: st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
}
ADAPTER_ALSO_RIGHT = {  # types a field takes besides the one of its saved value
    ("base_model_name_or_path",): {str},
    ("config", "tokenizer_name_or_path"): {str},
    **{("config", name): {type(None)} for name in ("cpt_mask", "cpt_tokens_type_mask")},  # None: CPTConfig's default
    ("config", "num_virtual_tokens"): {type(None)},  # derived from the ids; checked only when given
    ("task", "template", "end_token"): {str},
    ("task",): {type(None)},
    ("task", "labels"): {type(None)},
    ("task", "template"): {type(None)},
}
CHECKPOINT_ALSO_RIGHT = {
    ("python_rng", 2): {int, float},
    ("config", "max_grad_norm"): {type(None)},
    ("fingerprint",): {type(None)},  # a loader given no fingerprint to compare takes a checkpoint without one
    **{("config", name): {type(None), int} for name in ("max_steps", "eval_every", "checkpoint_every")},
}
BUILT = {("config",), ("task", "template")}  # objects a class checks (CPTConfig, Template, TrainConfig)
PROPERTIES = settings(max_examples=150, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _paths(value, path=()):
    """Every field: object keys, and the first, second and last item of a list."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = [(i, value[i]) for i in sorted({0, 1, len(value) - 1}) if 0 <= i < len(value)]
    else:
        items = []
    for key, item in items:
        yield (*path, key)
        yield from _paths(item, (*path, key))


def _at(meta, path):
    for key in path:
        meta = meta[key]
    return meta


def _wrong_types(meta, path, also_right) -> list[type]:
    saved = type(_at(meta, path))
    right = {saved, *also_right.get(path, ())} | ({int} if saved is float else set())
    if path[0] == "eval_history" and path[-1] != "step":  # metrics: any number
        right |= {int, float}
    return [t for t in WRONG if t not in right]


def _named(message: str, path: tuple, declared_below_built: set[tuple]) -> bool:
    """Whether ``message`` names the field at ``path``: its whole path, or, inside an object a
    class builds, that object's path and the key below it."""
    dotted = ""
    for key in path:
        dotted = field_path(dotted, key)
    built = next((path[: len(b)] for b in BUILT if path[: len(b)] == b and len(path) > len(b)), None)
    if built is None or path[: len(built) + 1] in declared_below_built:
        return f"field '{dotted}'" in message
    outer = ".".join(built)
    return f"field '{outer}'" in message and str(path[len(built)]) in message


def _edit(file: Path, path: tuple, value, resign: bool) -> None:
    meta = json.loads(file.read_text())
    _at(meta, path[:-1])[path[-1]] = value
    if resign and path != ("state_sha256",):
        meta.pop("state_sha256")
        meta["state_sha256"] = hashlib.sha256(_io.json_bytes(meta)).hexdigest()  # a careful forger
    file.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def model() -> CPTModel:
    model = moved_model()
    return model


@pytest.fixture(scope="module")
def adapter(model: CPTModel, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "a"
    task = {"template": {"input_template": "in: {}", "end_token": None}, "labels": ["pos", "neg", "mixed"]}
    write_adapter(folder, model.config, model.base, model.delta, vocab_size=96, task=task,
                  base_model_name_or_path=None)
    return folder


CONFIG = TrainConfig(batch_size=1, progress=False, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def checkpoint(model: CPTModel, tmp_path_factory) -> Path:
    """A checkpoint with every field filled: evaluations, a selection, a fingerprint, moments."""
    folder = tmp_path_factory.mktemp("checkpoint") / "last"
    optimizer = make_optimizer(model, CONFIG)
    for _ in range(4):
        model.delta.grad = torch.ones_like(model.delta)
        optimizer.step()
        model.project_()
    model.delta.grad = None
    state = TrainState(step=4, epoch=1, position=1, losses=[1.0, 0.9, 0.8, 0.7],
                       eval_history=[{"step": 2, "acc": 0.5}, {"step": 4, "acc": 0.75}],
                       selection=Selection(2, 1, 0.75, model.delta.detach().clone()))
    save_checkpoint(folder, model, optimizer, state, CONFIG, num_samples=3,
                    fingerprint={"context": "0" * 64, "samples": "1" * 64})
    return folder


def _refused(folder: Path, name: str, path: tuple, value, load) -> str:
    with tempfile.TemporaryDirectory() as root:
        copy = Path(root) / folder.name
        shutil.copytree(folder, copy)
        _edit(copy / name, path, value, resign=name == STATE_JSON_NAME)
        with pytest.raises(ValueError) as error:
            load(copy)
        return str(error.value)


def _draw(data, meta, also_right):
    fields = [p for p in _paths(meta) if _wrong_types(meta, p, also_right)]
    path = data.draw(st.sampled_from(fields), label="field")
    value = data.draw(st.sampled_from(_wrong_types(meta, path, also_right)).flatmap(WRONG.__getitem__), label="value")
    return path, value


@PROPERTIES
@given(data=st.data())
def test_every_adapter_field_of_a_wrong_type_is_refused_naming_it(model, adapter, data) -> None:
    meta = json.loads((adapter / CPT_CONFIG_NAME).read_text())
    path, value = _draw(data, meta, ADAPTER_ALSO_RIGHT)
    message = _refused(adapter, CPT_CONFIG_NAME, path, value, lambda f: read_adapter(f, hidden_size=32, vocab_size=96))
    assert str(adapter.name) in message and _named(message, path, set()), message


@PROPERTIES
@given(data=st.data())
def test_every_checkpoint_field_of_a_wrong_type_is_refused_naming_it(model, checkpoint, data) -> None:
    meta = json.loads((checkpoint / STATE_JSON_NAME).read_text())
    path, value = _draw(data, meta, CHECKPOINT_ALSO_RIGHT)

    def load(folder: Path) -> None:
        fresh = CPTModel(model.base_model, model.config)
        load_checkpoint(folder, fresh, make_optimizer(fresh, CONFIG), config=CONFIG, num_samples=3)

    message = _refused(checkpoint, STATE_JSON_NAME, path, value, load)
    declared = {("config", name) for name in ("seed", "batch_size", "gradient_accumulation_steps", "learning_rate",
                                              "weight_decay", "max_grad_norm")}
    assert STATE_JSON_NAME in message and _named(message, path, declared), message
