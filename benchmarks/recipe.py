"""Development-half experiments behind fit's recipe: how far to train, and is leave-one-out a guide?

For each (data set of the development half, K, seed) the context is the benchmark's own draw
(`cpt.labelled_data.split_examples` with the benchmark's 100 test examples drawn first and never
scored here); *validation* examples are drawn from what is left. Each training setting runs
once and, at a few points along the way (step 0, the untrained context, included), records:

- ``loo_log_prob`` / ``loo_accuracy``: `cpt.selection.leave_one_out` on the context's own
  examples (what a user can compute);
- ``val_accuracy`` / ``val_macro_f1`` and their calibrated twins (``val_cal_*``): on the
  validation examples (what we judge the selection by, and the user never has).

So one run says both what training to a fixed step gives and what selecting the step by
leave-one-out gives. One JSON line per (data set, K, seed, setting), appended; ``--resume``-style
skipping is always on.

    python -m benchmarks.recipe --datasets sst2_sentences trec --k 1 2 --seeds 0 1 2 \\
        --out benchmarks/recipe_dev.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpt import CPTModel, Template, TrainConfig, build_context, classify  # noqa: E402
from cpt.data import CPTCollator, CPTDataset  # noqa: E402
from cpt.metrics import accuracy, macro_f1  # noqa: E402
from cpt.selection import leave_one_out  # noqa: E402
from cpt.train import train  # noqa: E402
from cpt.workflow import CONTEXT_DEFAULTS  # noqa: E402

N_TEST = 100  # the benchmark's test draw, skipped here so its examples stay unseen

# name: learning rate, "steps" (a number) or "epochs" (over the n context examples), input/format epsilon,
# loss type, and how many points along the run are measured
SETTINGS: dict[str, dict[str, Any]] = {
    "old-default": {"lr": 1e-4, "epochs": 5, "eps": (0.2, 0.1), "loss": "decay", "points": 1},
    "lr1e-3": {"lr": 1e-3, "steps": 48, "eps": (1.0, 0.5), "loss": "decay", "points": 4},
    "lr1e-3-nodecay": {"lr": 1e-3, "steps": 48, "eps": (1.0, 0.5), "loss": "none", "points": 4},
    "lr3e-3": {"lr": 3e-3, "steps": 48, "eps": (1.0, 0.5), "loss": "decay", "points": 4},
    "lr1e-3-eps0.2": {"lr": 1e-3, "steps": 48, "eps": (0.2, 0.1), "loss": "decay", "points": 4},
    # fit's defaults (10 epochs over the context's n examples), seen at 5 points; and the same with
    # half the radii: what one example per label wants (the report half's weakest K)
    "fit-default": {"lr": 1e-3, "epochs": 10, "eps": (1.0, 0.5), "loss": "decay", "points": 5},
    "fit-eps0.5": {"lr": 1e-3, "epochs": 10, "eps": (0.5, 0.25), "loss": "decay", "points": 5},
}


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.summary:
        records = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.startswith("{")]
        records = [r for r in records if r["setting"] in args.settings]
        print(summary(records))
        return
    torch.set_num_threads(args.threads)
    from cpt.labelled_data import load_dataset, split_examples
    from cpt.pretrained import load_model_and_tokenizer

    base_model, tokenizer = load_model_and_tokenizer(args.model, device="cpu")
    out = Path(args.out)
    done = set()
    if out.is_file():
        for line in out.read_text().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                done.add((r["dataset"], r["K"], r["seed"], r["setting"]))
    template = Template()
    for seed in args.seeds:
        for name in args.datasets:
            data = load_dataset(name)
            for k in args.k:
                context, val, _ = split_examples(data, per_class=k, n_test=N_TEST, n_train=args.val, seed=seed)
                for setting in args.settings:
                    if (name, k, seed, setting) in done:
                        continue
                    started = time.perf_counter()
                    record = _run(base_model, tokenizer, template, data.labels, context, val, seed, SETTINGS[setting])
                    record.update(dataset=name, K=k, seed=seed, setting=setting, n_val=len(val),
                                  seconds=round(time.perf_counter() - started, 1))
                    print(json.dumps(record), flush=True)
                    with out.open("a") as f:
                        f.write(json.dumps(record) + "\n")


def _run(base_model, tokenizer, template, labels, context, val, seed, setting) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    eps, format_eps = setting["eps"]
    options = {**CONTEXT_DEFAULTS, "opt_projection_epsilon": eps, "opt_projection_format_epsilon": format_eps,
               "opt_weighted_loss_type": setting["loss"]}
    config = build_context(tokenizer, context, template, **options)
    model = CPTModel(base_model, config)
    n = len(context)
    steps = setting.get("steps") or setting["epochs"] * n
    every = max(1, steps // setting["points"])
    truths = [e.label for e in val]

    def measure(m: CPTModel) -> dict[str, float]:
        loo = leave_one_out(m, tokenizer, context, labels, template=template)
        result = classify(m, tokenizer, [e.text for e in val], labels, template=template, calibrate=True)
        plain = [labels[j] for j in result.log_likelihoods.argmax(dim=-1).tolist()]
        return {**loo, "val_accuracy": accuracy(plain, truths), "val_macro_f1": macro_f1(plain, truths, labels),
                "val_cal_accuracy": accuracy(result.predictions, truths),
                "val_cal_macro_f1": macro_f1(result.predictions, truths, labels)}

    trajectory = [{"step": 0, **measure(model)}]
    train_config = TrainConfig(learning_rate=setting["lr"], max_steps=steps, seed=seed, progress=False,
                               eval_every=every)
    result = train(model, CPTDataset(tokenizer, context, template), train_config,
                   collator=CPTCollator(tokenizer.pad_token_id), eval_fn=measure)
    trajectory += result.eval_history
    rows = model.context.trainable_rows.squeeze(1)
    return {"n_context": n, "steps": steps, "trajectory": trajectory,
            "final_loss": result.losses[-1], "mean_delta_norm": float(model.delta.detach()[rows].norm(dim=1).mean()),
            "context_tokens": model.num_virtual_tokens}


def summary(records: list[dict[str, Any]]) -> str:
    """Validation accuracy (%) per setting and way of choosing the step, mean ± std over cells.

    Ways: ``ICL`` (step 0), ``step s`` (the context after s steps), ``last``, and ``LOO`` (the
    step with the best leave-one-out log-probability, step 0 included, as `fit` does). Each with
    plain and calibrated scoring. Only (data set, K, seed) cells that every listed setting ran
    are counted, so the rows compare like with like.
    """
    import statistics

    settings = list(dict.fromkeys(r["setting"] for r in records))
    cells = [set((r["dataset"], r["K"], r["seed"]) for r in records if r["setting"] == s) for s in settings]
    common = set.intersection(*cells) if cells else set()
    lines = [f"{len(common)} cells: " + ", ".join(sorted({f"{d} K={k}" for d, k, _ in common})), "",
             "| setting | choice | val acc | val acc, calibrated | val macro-F1 | mean step chosen |",
             "|---|---|---|---|---|---|"]

    def fmt(values: list[float]) -> str:
        if len(values) < 2:
            return f"{100 * values[0]:.1f}" if values else "-"
        return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"

    for setting in settings:
        runs = [r for r in records if r["setting"] == setting and (r["dataset"], r["K"], r["seed"]) in common]
        if not runs:
            continue
        choices: dict[str, list[dict[str, float]]] = {"ICL (step 0)": [r["trajectory"][0] for r in runs]}
        steps = sorted({p["step"] for r in runs for p in r["trajectory"] if p["step"]})
        lengths = {len(r["trajectory"]) for r in runs}
        if len(steps) <= 6:
            for step in steps:
                points = [next((p for p in r["trajectory"] if p["step"] == step), None) for r in runs]
                if all(points):
                    choices[f"step {step}"] = points  # type: ignore[assignment]
        elif len(lengths) == 1:  # runs of different lengths (steps scale with n): the same fraction of each
            last = lengths.pop() - 1
            for i in range(1, last + 1):
                choices[f"{i}/{last} of the steps"] = [r["trajectory"][i] for r in runs]
        choices["last"] = [r["trajectory"][-1] for r in runs]
        choices["LOO"] = [max(r["trajectory"], key=lambda p: (p["loo_log_prob"], -p["step"])) for r in runs]
        # fit's rule: leave-one-out only with 2 or more examples of every label, else the last
        choices["LOO if K >= 2, else last"] = [
            max(r["trajectory"], key=lambda p: (p["loo_log_prob"], -p["step"])) if r["K"] >= 2 else r["trajectory"][-1]
            for r in runs
        ]
        for name, points in choices.items():
            lines.append(
                f"| {setting} | {name} | {fmt([p['val_accuracy'] for p in points])} | "
                f"{fmt([p['val_cal_accuracy'] for p in points])} | {fmt([p['val_macro_f1'] for p in points])} | "
                f"{statistics.fmean(p['step'] for p in points):.0f} |"
            )
    lines += ["", "Per cell (val accuracy %, plain): ICL, then each setting's last step and fit's rule.", "",
              "| data set | K | seed | ICL | " + " | ".join(f"{x} last | {x} rule" for x in settings) + " |",
              "|---|---|---|---|" + "---|---|" * len(settings)]
    for cell in sorted(common):
        runs = {r["setting"]: r for r in records if (r["dataset"], r["K"], r["seed"]) == cell}
        first = next(iter(runs.values()))
        cells = []
        for setting in settings:
            r = runs[setting]
            rule = max(r["trajectory"], key=lambda p: (p["loo_log_prob"], -p["step"])) if r["K"] >= 2 else r["trajectory"][-1]
            cells += [f"{100 * r['trajectory'][-1]['val_accuracy']:.0f} ({r['trajectory'][-1]['step']})",
                      f"{100 * rule['val_accuracy']:.0f} ({rule['step']})"]
        lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]} | {100 * first['trajectory'][0]['val_accuracy']:.0f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe")
    parser.add_argument("--datasets", nargs="+", default=[])
    parser.add_argument("--summary", action="store_true", help="print the summary of --out's runs of --settings")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["old-default", "lr1e-3"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/recipe_dev.jsonl")
    return parser


if __name__ == "__main__":
    main()
