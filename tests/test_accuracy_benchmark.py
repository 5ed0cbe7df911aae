"""Smoke test of benchmarks/accuracy.py on a tiny model and a tiny data set (no download)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny_models import make_model
from tokenizers_util import make_bpe_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` lives beside the package, not inside it
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import accuracy  # noqa: E402

WORDS = ("great", "awful", "fine", "boring", "good", "thin", "long", "story", "film", "movie")


@pytest.fixture
def tiny_setup(tmp_path: Path) -> tuple[Path, Path]:
    tokenizer = make_bpe_tokenizer()
    model = make_model("llama", vocab_size=len(tokenizer))
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    lines = []
    for i in range(40):
        text = f"the {WORDS[i % len(WORDS)]} {WORDS[(3 * i + 1) % len(WORDS)]} {i}"
        lines.append(json.dumps({"text": text, "label": "positive" if i % 2 else "negative"}))
    data.write_text("\n".join(lines) + "\n")
    return model_dir, data


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--datasets", str(data), "--k", "1", "--seeds", "0", "1",
        "--test", "6", "--device", "cpu", "--threads", "1", "--output-dir", str(out), *extra,
    ]


def test_every_method_gives_a_record_a_table_and_peft_matches_cpt(tiny_setup, tmp_path, capsys) -> None:
    model_dir, data = tiny_setup
    out = tmp_path / "out"
    methods = ["zero-shot", "icl", "icl-cal", "cpt", "cpt-cal", "peft"]
    records = accuracy.main(_args(model_dir, data, out, "--peft-seeds", "0", "--methods", *methods,
                                  "--name", "accuracy"))
    ran = [(r["seed"], r["method"]) for r in records]
    five = ["zero-shot", "icl", "icl-cal", "cpt", "cpt-cal"]
    expected = [(0, m) for m in five] + ([(0, "peft")] if accuracy._have_peft() else [])
    assert ran == expected + [(1, m) for m in five]
    for r in records:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0 and r["n_test"] == 6
        assert r["K"] == (0 if r["method"] == "zero-shot" else 1)
        assert sum(r["predictions"].values()) == 6
    for r in records:
        if r["method"].endswith("-cal"):
            assert len(r["prior"]) == 2 and sum(r["prior"]) == pytest.approx(1, abs=1e-3)
    if accuracy._have_peft():
        peft_run = next(r for r in records if r["method"] == "peft")
        cpt_run = next(r for r in records if r["method"] == "cpt" and r["seed"] == 0)
        assert peft_run["context_rel_diff"] < 1e-5  # same samples, order and optimizer as cpt.fit
        assert peft_run["first_loss"] == pytest.approx(cpt_run["first_loss"], rel=1e-5)
    written = [json.loads(line) for line in (out / "accuracy_runs.jsonl").read_text().splitlines()]
    assert written == records
    table = (out / "accuracy_table.md").read_text()
    assert "| data set | K | zero-shot | ICL | ICL+cal | CPT | CPT+cal | CPT (PEFT) |" in table
    assert "### Macro-F1 (%)" in table and "| CPT - ICL, mean over cells | >= +10 |" in table
    assert table in capsys.readouterr().out

    # a second run appends nothing: every (set, K, seed, method) is done
    again = accuracy.main(_args(model_dir, data, out, "--peft-seeds", "0", "--methods", *methods,
                                "--name", "accuracy"))
    assert again == records
    assert len((out / "accuracy_runs.jsonl").read_text().splitlines()) == len(records)


def test_an_interrupted_run_resumes_where_it_stopped(tiny_setup, tmp_path) -> None:
    model_dir, data = tiny_setup
    out = tmp_path / "out"
    first = accuracy.main(_args(model_dir, data, out, "--name", "a", "--seeds", "0"))
    both = accuracy.main(_args(model_dir, data, out, "--name", "a"))
    assert both[: len(first)] == first
    assert {r["seed"] for r in both[len(first) :]} == {1}
    fresh = accuracy.main(_args(model_dir, data, out, "--name", "a", "--fresh", "--seeds", "1"))
    assert [_untimed(r) for r in fresh] == [_untimed(r) for r in both[len(first) :]]


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.endswith("seconds")}


def test_quick_smoke_mode_runs_one_small_cell(tiny_setup, tmp_path) -> None:
    model_dir, data = tiny_setup
    records = accuracy.main(["--quick", "--model", str(model_dir), "--datasets", str(data),
                             "--device", "cpu", "--output-dir", str(tmp_path)])
    assert {r["method"] for r in records} == {"zero-shot", "icl", "icl-cal", "cpt", "cpt-cal"}
    assert all(r["n_test"] == 8 and r["seed"] == 0 for r in records)
    assert all(r["steps"] == 2 for r in records if r["method"].startswith("cpt"))
    assert (tmp_path / "accuracy_quick_table.md").is_file()


def test_the_two_halves_are_disjoint_and_cover_the_shipped_sets() -> None:
    from cpt.labelled_data import BUILTIN_DATASETS

    assert not set(accuracy.DEV_SETS) & set(accuracy.REPORT_SETS)
    assert len(accuracy.DEV_SETS) == len(accuracy.REPORT_SETS) == 5
    assert set(accuracy.DEV_SETS) | set(accuracy.REPORT_SETS) == set(BUILTIN_DATASETS) - {"sst2"}


def test_targets_compare_cpt_with_icl_per_cell() -> None:
    def run(dataset, k, seed, method, acc, labels=2):
        return {"dataset": dataset, "K": k, "seed": seed, "method": method, "accuracy": acc,
                "macro_f1": acc, "n_test": 10, "labels": labels}

    records = [run("a", 1, s, "icl", 0.5) for s in (0, 1)] + [run("a", 1, s, "cpt", 0.7) for s in (0, 1)]
    records += [run("b", 1, 0, "icl", 0.6, 4), run("b", 1, 0, "cpt", 0.5, 4), run("b", 1, 0, "icl-cal", 0.4, 4)]
    records.append(run("a", 1, 2, "icl", 0.0))  # a seed CPT has not run yet: not compared
    text = accuracy.targets(records)
    assert "| CPT - ICL, mean over cells | >= +10 | +5.0 |" in text
    assert "| worst cell, CPT - ICL | >= -2 | -10.0 (b, K = 1) |" in text
    assert "| CPT - calibrated ICL, mean | > 0 | +10.0 |" in text
    assert "| two-class sets, CPT - ICL, worst cell | >= +5 | +20.0 (mean +20.0) |" in text


def test_sweep_scores_validation_examples_only(tiny_setup, tmp_path) -> None:
    model_dir, data = tiny_setup
    out = tmp_path / "out"
    records = accuracy.main(
        _args(model_dir, data, out, "--sweep", "--val", "5", "--sweep-lr", "1e-3",
              "--sweep-epochs", "1", "--sweep-epsilon", "0.2/0.1", "1/0.5")
    )
    assert [r["method"] for r in records] == ["icl", "cpt", "cpt"] * 2
    assert all(r["n_val"] == 5 and "accuracy" not in r for r in records)
    assert "validation accuracy" in (out / "accuracy_sweep_table.md").read_text()


def test_cpt_options_override_the_defaults_and_are_recorded(tiny_setup, tmp_path) -> None:
    model_dir, data = tiny_setup
    args = _args(model_dir, data, tmp_path / "out", "--methods", "cpt", "--cpt-lr", "1e-3",
                 "--cpt-epochs", "2", "--cpt-epsilon", "1/0.5")
    records = accuracy.main([*args, "--cpt-select", "none"])
    assert {r["method"] for r in records} == {"cpt"}
    for r in records:
        assert r["hyper"] == {"lr": 1e-3, "epochs": 2, "epsilon": 1.0, "format_epsilon": 0.5, "selection": None}
        assert r["steps"] == 2 * 2  # 2 examples (K = 1, 2 labels) x 2 epochs


def test_markdown_table_shows_mean_and_std_over_seeds() -> None:
    records = [
        {"dataset": "d", "K": 0, "seed": s, "method": "zero-shot", "accuracy": a, "n_test": 10}
        for s, a in ((0, 0.5), (1, 0.7))
    ] + [
        {"dataset": "d", "K": 2, "seed": s, "method": "icl", "accuracy": a, "n_test": 10}
        for s, a in ((0, 0.6), (1, 0.8))
    ]
    table = accuracy.markdown_table(records, ["zero-shot", "icl"])
    assert "| d | 2 | 60.0 ± 14.1 | 70.0 ± 14.1 | 2 | 10 |" in table


def test_paired_table_compares_cpt_with_each_baseline_on_the_same_seed() -> None:
    def run(dataset, k, seed, method, acc):
        return {"dataset": dataset, "K": k, "seed": seed, "method": method, "accuracy": acc, "n_test": 10}

    records = [run("a", 0, 0, "zero-shot", 0.5), run("a", 0, 1, "zero-shot", 0.3)]
    records += [run("a", 2, 0, "icl", 0.6), run("a", 2, 1, "icl", 0.4), run("a", 2, 2, "icl", 0.9)]
    records += [run("a", 2, 0, "cpt", 0.7), run("a", 2, 1, "cpt", 0.3)]  # seed 2: no CPT, not paired
    records += [run("b", 1, 0, "icl", 0.5), run("b", 1, 0, "cpt", 0.6), run("b", 1, 0, "icl-cal", 0.8)]
    table = accuracy.paired_table(records)
    assert "| a | 2 | +0.0 ± 14.1 | - | +10.0 ± 14.1 | 1 of 2 |" in table  # (+10, -10); (+20, +0)
    assert "| b | 1 | +10.0 | -20.0 | - | 1 of 1 |" in table
    assert "| mean over sets, K = 2 | | +0.0 | - | +10.0 | |" in table
    assert "| all cells | | +5.0 | -20.0 | +10.0 | |" in table
