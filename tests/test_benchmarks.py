"""Smoke tests of the benchmark scripts: CPU size, in-process, well-formed JSON result lines."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` lives beside the package, not inside it
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common, projection, speed  # noqa: E402

HAVE_PEFT = importlib.util.find_spec("peft") is not None

QUICK_SPEED = ["--suite", "cpu", "--quick", "--steps", "1", "--warmup", "0"]
QUICK_PROJECTION = ["--quick", "--no-compile", "--device", "cpu", "--iters", "2", "--repeats", "2"]


def json_lines(text: str) -> list[dict]:
    """Every line that looks like JSON must parse as a JSON object."""
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert all(isinstance(r, dict) for r in records)
    return records


def run_quick(bench, args: list[str], capsys, output, key: str):  # type: ignore[no-untyped-def]
    """Runs a benchmark's ``main`` writing its table to ``output``; checks that it printed its
    environment first, then one JSON line per record it returned (those holding ``key``)."""
    returned = bench.main([*args, "--output", str(output)])
    lines = json_lines(capsys.readouterr().out)
    assert lines[0]["kind"] == "environment" and lines[0]["bench"] == bench.__name__.rsplit(".", 1)[-1]
    records = [r for r in lines if key in r]
    assert records == returned
    return records


def test_speed_quick_prints_one_json_line_per_case(capsys, tmp_path):
    output = tmp_path / "table.md"
    cases = run_quick(speed, QUICK_SPEED, capsys, output, "case")
    assert [c["case"] for c in cases] == ["tiny:64:4", "tiny:64:1"]
    assert [c["cpt_path"] for c in cases] == ["shared", "plain"]  # context_sharing="auto"
    for case in cases:
        for key in ("cpt_train_ms", "cpt_cache_ms", "cpt_infer_ms"):
            assert case[key] > 0, key
        assert case["cpt_train_peak_gib"] is None  # not tracked on the CPU
        assert case["cpt_tflops"] > 0
        if HAVE_PEFT:
            assert case["peft_train_ms"] > 0 and case["peft_infer_ms"] > 0
            assert case["train_ratio"] == pytest.approx(case["cpt_train_ms"] / case["peft_train_ms"], rel=1e-2)
            # same model, context and batch, float32, delta = 0: the same loss
            assert case["loss_rel_diff"] < 1e-5
    table = output.read_text()
    assert "| model:N:B |" in table and "| tiny:64:4 |" in table


def test_speed_reports_a_case_that_cannot_run_and_goes_on(capsys):
    records = speed.main(["--suite", "cpu", "--steps", "1", "--warmup", "0", "--only", "cpt",
                          "--cases", "nosuchmodel:64:2,tiny:40:2"])
    json_lines(capsys.readouterr().out)
    assert records[0]["case"] == "nosuchmodel:64:2" and records[0]["status"] == "skipped"
    assert records[1]["case"] == "tiny:40:2" and records[1]["cpt_train_ms"] > 0
    assert "peft_train_ms" not in records[1]


def test_speed_skips_a_checkpointing_case_that_cpt_cannot_run(monkeypatch):
    monkeypatch.setattr(speed, "checkpointing_argument", lambda: None)
    args = speed.build_parser().parse_args(["--suite", "cpu", "--steps", "1", "--warmup", "0"])
    args.device = torch.device("cpu")
    model = common.build_random_model(common.llama_config("tiny"), "cpu", torch.float32)
    record = speed.run_case(model, speed.Case("tiny", 64, 2, cpt_only=True, checkpointing=True), args)
    assert record["status"] == "skipped" and "checkpointing" in record["reason"]
    json.dumps(record)


def test_projection_quick_prints_one_json_line_per_method(capsys, tmp_path):
    output = tmp_path / "table.md"
    methods = run_quick(projection, QUICK_PROJECTION, capsys, output, "method")
    expected = ["eager", "cpt_inplace", "peft_masked"] + (["peft_module"] if HAVE_PEFT else [])
    assert [m["method"] for m in methods] == expected
    for method in methods:
        assert method["ms"] > 0
        assert method["max_abs_diff"] <= 1e-6  # every version projects to the same offsets
    assert "| eager |" in output.read_text()


def test_peft_masked_projection_matches_project():
    delta = torch.randn(50, 16) * torch.rand(50, 1)
    delta[3] = 0.0  # a zero row: PEFT's mask skips it
    eps = torch.rand(50) * 0.5
    eps[7] = 1e-10
    from cpt.projection import project

    torch.testing.assert_close(projection.peft_masked_projection(delta, eps), project(delta, eps), rtol=1e-6, atol=1e-7)


def test_synthetic_context_follows_the_type_code_pattern():
    context = common.synthetic_context(70, vocab_size=100, seed=0)
    assert context.num_tokens == 70 and context.mask == [1] * 70
    assert context.type_codes[: common.EXAMPLE_LEN] == common.EXAMPLE_ROLES
    second = context.type_codes[common.EXAMPLE_LEN : 2 * common.EXAMPLE_LEN]
    assert second == [r + 4 if r else 0 for r in common.EXAMPLE_ROLES]  # example 1: codes shifted by 4
    assert all(common.FIRST_TOKEN_ID <= i < 100 for i in context.token_ids)
    with pytest.raises(ValueError, match="label"):
        common.synthetic_context(10, vocab_size=100)


def test_random_model_is_finite_frozen_and_tied():
    model = common.build_random_model(common.llama_config("tiny"), "cpu", torch.float32, seed=0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not any(p.requires_grad for p in model.parameters())
    weight = model.get_input_embeddings().weight
    assert weight.std().item() == pytest.approx(common.INIT_STD, rel=0.05)
    logits = model(input_ids=torch.arange(3, 40).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()


def test_shared_step_flops_are_fewer_than_plain_ones():
    config = common.llama_config("8b")
    context = common.synthetic_context(8192, vocab_size=config.vocab_size)
    shared = speed.cpt_step_flops(config, context, batch_size=8, seq_len=32, shared=True)
    plain = speed.cpt_step_flops(config, context, batch_size=8, seq_len=32, shared=False)
    # about 4 * 7e9 params * 8448 tokens for the matmuls, plus attention
    assert 2.3e14 < shared < 3.5e14
    assert plain > 7 * shared


def test_markdown_table_formats_rows():
    text = common.markdown_table([{"a": 1.23456, "b": None}, {"a": "OOM", "b": "x|y"}], [("a", "A"), ("b", "B")])
    assert text.splitlines() == ["| A | B |", "|---|---|", "| 1.23 |  |", "| OOM | x\\|y |"]
