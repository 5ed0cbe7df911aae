"""The path decision as a table: inputs -> plan (`cpt.plan.resolve`), with no model involved."""

from __future__ import annotations

import pytest

from cpt.plan import (
    ONE_COPY_MIN_ROWS, ONE_COPY_MIN_ROWS_INFERENCE, Facts, Options, Plan, Why, choice, compiles_projection, resolve,
)

CPU, CUDA = Facts(), Facts(device_type="cuda")
LLAMA_ON_CUDA = CUDA
BLOOM = Facts(one_copy_exact=False)  # attention outside the interface
WINDOW_64 = Facts(sliding_window=64, device_type="cuda")
HF_CKPT = Facts(hf_checkpointing=True, device_type="cuda")
SHARDED = Facts(sharded=True, device_type="cuda")  # FSDP2 layers
AUTO = Options()
N = 40  # context tokens
BIG_B = ONE_COPY_MIN_ROWS // N + 1  # B x N past the training threshold
BIG_B_INFER = ONE_COPY_MIN_ROWS_INFERENCE // N + 1


def _plan(shared: bool, one_copy: bool = False, graphs: bool = False, **why: Why | bool) -> Plan:
    return Plan(shared, one_copy=one_copy, graphs=graphs, **why)


# (purpose, options, facts, B, S, grad) -> plan
TABLE = [
    # eager forward with labels: sharing from two samples on, one copy from B x N on, never graphs
    ("loss", AUTO, CPU, 1, 9, True,
     _plan(False, why_plain=Why.ONE_SAMPLE, why_not_one_copy=Why.ONE_SAMPLE, why_no_graphs=Why.EAGER)),
    ("loss", AUTO, CPU, 4, 9, True, _plan(True, why_not_one_copy=Why.SMALL, why_no_graphs=Why.EAGER)),
    ("loss", AUTO, CPU, BIG_B, 9, True, _plan(True, one_copy=True, why_no_graphs=Why.EAGER)),
    ("loss", Options(context_sharing="on"), CPU, 1, 9, True,
     _plan(True, why_not_one_copy=Why.SMALL, why_no_graphs=Why.EAGER)),
    ("loss", Options(context_sharing="off"), CPU, 4, 9, True,
     _plan(False, why_plain=Why.OPTION_OFF, why_not_one_copy=Why.OPTION_OFF, why_no_graphs=Why.EAGER)),
    ("loss", Options(shared_attention="on"), CPU, 4, 9, True, _plan(True, one_copy=True, why_no_graphs=Why.EAGER)),
    ("loss", Options(shared_attention="off"), CPU, BIG_B, 9, True,
     _plan(True, why_not_one_copy=Why.OPTION_OFF, why_no_graphs=Why.EAGER)),
    ("loss", Options(shared_attention="on"), BLOOM, 4, 9, True,
     _plan(True, why_not_one_copy=Why.NOT_EXACT, why_no_graphs=Why.EAGER)),
    ("loss", AUTO, HF_CKPT, 4, 9, True,
     _plan(False, why_plain=Why.HF_CHECKPOINTING, why_not_one_copy=Why.HF_CHECKPOINTING, why_no_graphs=Why.EAGER)),
    # a sliding window: the context must fit in it to be shared, context and samples for one copy
    ("loss", Options(shared_attention="on"), WINDOW_64, 4, 24, True,
     _plan(True, one_copy=True, why_no_graphs=Why.EAGER)),
    ("loss", Options(shared_attention="on"), WINDOW_64, 4, 25, True,
     _plan(True, why_not_one_copy=Why.SLIDING_WINDOW, why_no_graphs=Why.EAGER)),
    ("loss", AUTO, Facts(sliding_window=N), 4, 9, True,
     _plan(False, why_plain=Why.SLIDING_WINDOW, why_not_one_copy=Why.SLIDING_WINDOW, why_no_graphs=Why.EAGER)),
    # a training step: graphs on CUDA replay the shared path, at batch 1 too; eager elsewhere
    ("train", AUTO, LLAMA_ON_CUDA, 1, 9, True, _plan(True, graphs=True, why_not_one_copy=Why.SMALL)),
    ("train", AUTO, LLAMA_ON_CUDA, BIG_B, 9, True, _plan(True, one_copy=True, graphs=True)),
    ("train", AUTO, CPU, 1, 9, True,
     _plan(False, why_plain=Why.ONE_SAMPLE, why_not_one_copy=Why.ONE_SAMPLE, why_no_graphs=Why.NOT_CUDA)),
    ("train", AUTO, CPU, 4, 9, True, _plan(True, why_not_one_copy=Why.SMALL, why_no_graphs=Why.NOT_CUDA)),
    ("train", Options(cuda_graphs="off"), CUDA, 4, 9, True,
     _plan(True, why_not_one_copy=Why.SMALL, why_no_graphs=Why.OPTION_OFF)),
    ("train", Options(context_sharing="off"), CUDA, 4, 9, True,
     _plan(False, why_plain=Why.OPTION_OFF, why_not_one_copy=Why.OPTION_OFF, why_no_graphs=Why.PLAIN)),
    ("train", AUTO, HF_CKPT, 4, 9, True,
     _plan(False, why_plain=Why.HF_CHECKPOINTING, why_not_one_copy=Why.HF_CHECKPOINTING,
           why_no_graphs=Why.HF_CHECKPOINTING)),
    # a sharded model: its layers' collectives do not replay from a graph
    ("train", AUTO, SHARDED, 4, 9, True, _plan(True, why_not_one_copy=Why.SMALL, why_no_graphs=Why.SHARDED)),
    ("train", AUTO, Facts(sharded=True), 4, 9, True, _plan(True, why_not_one_copy=Why.SMALL, why_no_graphs=Why.SHARDED)),
    # ... and shares even one sample, so that every rank runs the same passes whatever its share
    ("train", AUTO, Facts(sharded=True), 1, 9, True, _plan(True, why_not_one_copy=Why.SMALL, why_no_graphs=Why.SHARDED)),
    # inference against the context's cache: the larger threshold without gradients
    ("infer", AUTO, CPU, BIG_B, 9, False,
     _plan(True, query_once=True, why_not_one_copy=Why.SMALL, why_no_graphs=Why.NOT_CUDA)),
    ("infer", AUTO, CPU, BIG_B_INFER, 9, False,
     _plan(True, one_copy=True, query_once=True, why_no_graphs=Why.NOT_CUDA)),
    ("infer", AUTO, CUDA, 8, 9, False, _plan(True, graphs=True, why_not_one_copy=Why.SMALL)),
    ("infer", Options(cuda_graphs="off"), CUDA, 8, 9, False,
     _plan(True, query_once=True, why_not_one_copy=Why.SMALL, why_no_graphs=Why.OPTION_OFF)),
    ("infer", AUTO, HF_CKPT, 8, 9, False, _plan(True, graphs=True, why_not_one_copy=Why.SMALL)),  # no gradients
    ("infer", Options(context_cache="off"), CUDA, 8, 9, False,
     _plan(False, why_plain=Why.OPTION_OFF, why_not_one_copy=Why.OPTION_OFF, why_no_graphs=Why.PLAIN)),
    ("infer", AUTO, Facts(sliding_window=N, device_type="cuda"), 8, 9, False,
     _plan(False, why_plain=Why.SLIDING_WINDOW, why_not_one_copy=Why.SLIDING_WINDOW, why_no_graphs=Why.SLIDING_WINDOW)),
    ("infer", AUTO, WINDOW_64, 8, 9, False,  # a window: queries are not run once (reach counted in indices)
     _plan(True, graphs=True, why_not_one_copy=Why.SMALL)),
    ("infer", Options(cuda_graphs="off"), Facts(sliding_window=64), 8, 9, False,
     _plan(True, why_not_one_copy=Why.SMALL, why_no_graphs=Why.OPTION_OFF)),
]


@pytest.mark.parametrize(("purpose", "options", "facts", "batch_size", "seq_len", "grad", "expected"), TABLE)
def test_the_plan_table(purpose, options, facts, batch_size, seq_len, grad, expected):  # type: ignore[no-untyped-def]
    plan = resolve(purpose, options, facts, num_context=N, batch_size=batch_size, seq_len=seq_len, grad=grad)
    assert plan == Plan(**{**vars(expected), "causal_context": facts.one_copy_exact})


@pytest.mark.parametrize(
    ("purpose", "options", "facts", "message"),
    [
        ("train", Options(cuda_graphs="on"), CPU, "cuda_graphs is on but the model is not on a CUDA device"),
        ("train", Options(cuda_graphs="on", context_sharing="off"), CUDA,
         "cuda_graphs is on but the context is neither shared nor cached"),
        ("infer", Options(cuda_graphs="on", context_cache="off"), CPU,
         "cuda_graphs is on but the context is neither shared nor cached"),
        ("train", Options(cuda_graphs="on"), Facts(sharded=True),
         "cuda_graphs is on but the base model is sharded with FSDP2"),
        ("infer", Options(context_cache="on"), Facts(sliding_window=N),
         "the context cannot be cached: the context outruns"),
    ],
)
def test_an_option_that_is_on_and_cannot_be_honoured_is_refused(purpose, options, facts, message):  # type: ignore
    with pytest.raises(ValueError, match=message):
        resolve(purpose, options, facts, num_context=N, batch_size=4, seq_len=9, grad=True)


def test_one_spelling_per_value() -> None:
    for value in ("auto", "on", "off"):
        assert choice("x", value) == value
    for bad in ("yes", 1, 0, "ON", 2.0):
        with pytest.raises(ValueError, match=r"^x must be one of \('auto', 'on', 'off'\), got"):
            choice("x", bad)
    with pytest.raises(ValueError, match="context_cache must be one of"):
        Options(context_cache="sometimes")


@pytest.mark.parametrize(
    ("old", "new"), [("always", "on"), (True, "on"), ("never", "off"), (False, "off"), (None, "auto")]
)
def test_an_old_spelling_is_refused_naming_the_new_one(old, new) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=rf"^x={old!r} is no longer accepted: write x={new!r}$"):
        choice("x", old)
    with pytest.raises(ValueError, match=rf"^context_sharing={old!r} is no longer accepted"):
        Options(context_sharing=old)


def test_the_projection_compiles_on_cuda_unless_told() -> None:
    assert [compiles_projection("auto", device) for device in ("cpu", "cuda")] == [False, True]
    assert [compiles_projection("on", "cpu"), compiles_projection("off", "cuda")] == [True, False]


def test_a_plan_cannot_be_changed() -> None:
    plan = resolve("loss", AUTO, CPU, num_context=N, batch_size=4, seq_len=9, grad=True)
    with pytest.raises(AttributeError):
        plan.shared = False  # type: ignore[misc]
