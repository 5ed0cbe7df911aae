"""How accurate is a CPT context, against zero-shot and in-context learning, calibrated or not?

The paper's few-shot setting (Blau et al., "Context-aware Prompt Tuning", arXiv 2410.17222): K
labelled examples of each class form the context; CPT trains that context on those same
examples. For every data set, K and seed, on the same held-out test examples and with the same
template and scoring (`cpt.infer.classify`: summed log-likelihood of each label's continuation):

- **zero-shot**: no examples. A context must hold at least one token, and the honest "nothing"
  is the token that precedes every query in ICL: the template's end token (the tokenizer's eos).
  So the context is that one separator token (type 0, never trained) and the query, label and
  scoring are exactly ICL's. This does not depend on K: it is run once per (data set, seed) and
  reported with ``K = 0``.
- **ICL**: the K examples per class as the context, no training (a `CPTModel` with delta = 0).
- **ICL + calibration** (``icl-cal``): the same scores, each text's label probabilities divided
  by those of content-free inputs ("N/A", "", "[MASK]", averaged; Zhao et al. 2021,
  `cpt.calibration`). Computed from the same `classify` call as ICL.
- **CPT**: ``cpt.fit`` on the context's own examples with the library's defaults
  (``cpt.workflow.CONTEXT_DEFAULTS``, ``TrainConfig()`` and fit's leave-one-out selection; only
  ``seed`` follows the run's seed), unless ``--cpt-lr``, ``--cpt-epochs``, ``--cpt-epsilon`` or
  ``--cpt-select`` say otherwise (recorded as ``hyper``).
- **CPT + calibration** (``cpt-cal``): CPT's scores calibrated as above.
- **PEFT** (only when asked for): PEFT's ``CPTConfig`` / ``get_peft_model`` on a copy of the
  same base model, trained on exactly the same samples with the same hyper-parameters and no
  selection, scored with the same ``classify``; ``context_rel_diff`` records how far PEFT's
  trained context is from cpt's trained the same way.

Every run records accuracy and macro-F1 (`cpt.metrics`). Each seed draws its own test set, then
its own context (`cpt.labelled_data.split_examples`: the test set first, so every K is scored on the
same test examples). Nothing is tuned on test examples.

**Two halves, fixed before any run.** `DEV_SETS` is where defaults are chosen (they include the
four sets earlier sessions already looked at); `REPORT_SETS` is only measured, with the defaults
chosen on the development half. ``--half`` picks one (default: the report half).

``--sweep`` is the one place where hyper-parameters vary: it scores CPT on a *validation* set
drawn from the examples left after the test set and the context (`benchmarks/recipe.py` is the
development half's study of the recipe).

Output (under ``--output-dir``, default ``docs/``): ``<name>_runs.jsonl`` (one JSON line per run,
appended as runs finish; runs already there are skipped, so an interrupted run resumes and a
later one adds seeds or sets; ``--fresh`` starts over), ``<name>_table.md`` (mean ± sample
standard deviation over seeds, accuracy and macro-F1, and the issue's targets) and
``<name>.png`` (one panel per K, if matplotlib is importable). The JSON lines and the table are
printed too.

Examples::

    python -m benchmarks.accuracy --quick --model TINY_MODEL_DIR   # smoke test: seconds
    python -m benchmarks.accuracy --half dev --name accuracy_dev    # the development half
    python -m benchmarks.accuracy --half report --name accuracy_report   # the report half
    python -m benchmarks.accuracy --datasets sst2_sentences --k 2 --test 100 --sweep --val 100
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file: make `cpt` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpt import CPTConfig, CPTModel, Template, TrainConfig, build_context, classify, fit  # noqa: E402
from cpt.cli import HelpFormatter  # noqa: E402
from cpt.data import CPTCollator, CPTDataset, Example  # noqa: E402
from cpt.metrics import accuracy, macro_f1  # noqa: E402
from cpt.train import epoch_order  # noqa: E402
from cpt.workflow import CONTEXT_DEFAULTS  # noqa: E402

# The split, fixed before any run of the wide benchmark. The development half holds the four sets
# that earlier sessions measured and tuned on (rotten_tomatoes, sst2_sentences, agnews, trec) and
# one more; the report half, never used to choose anything, holds two two-class sets.
DEV_SETS = ("rotten_tomatoes", "sst2_sentences", "agnews", "trec", "tweet_eval_emotion")
REPORT_SETS = ("subjective", "tweet_eval_hate", "financial_phrasebank", "sst5", "hate_speech_18")
HALVES = {"dev": DEV_SETS, "report": REPORT_SETS, "all": DEV_SETS + REPORT_SETS}
METHODS = ("zero-shot", "icl", "icl-cal", "cpt", "cpt-cal", "peft")
DEFAULT_METHODS = ("zero-shot", "icl", "icl-cal", "cpt", "cpt-cal")
METHOD_NAMES = {"zero-shot": "zero-shot", "icl": "ICL", "icl-cal": "ICL+cal", "cpt": "CPT",
                "cpt-cal": "CPT+cal", "peft": "CPT (PEFT)"}
QUICK = {"k": [1], "seeds": [0], "test": 8}  # with the first set of the half unless --datasets

# --sweep: the default grid around the old defaults (lr 1e-4, 5 epochs, eps 0.2 / 0.1)
SWEEP_LR = [1e-4, 1e-3, 1e-2]
SWEEP_EPOCHS = [5]
SWEEP_EPSILON = ["0.2/0.1", "1/0.5", "4/2"]  # input/format radii at d = 2048


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark; returns the run records (also written and printed)."""
    args = _parser().parse_args(argv)
    args.datasets = args.datasets or list(HALVES[args.half])
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.datasets = args.datasets[:1]
        args.name = args.name or "accuracy_quick"
        args.quick_steps = 2
    else:
        args.quick_steps = None
    args.k = args.k or [1, 2, 4]
    args.seeds = args.seeds if args.seeds is not None else [0, 1, 2, 3, 4]
    args.test = args.test or 100
    args.name = args.name or ("accuracy_sweep" if args.sweep else f"accuracy_{args.half}")
    methods = [m for m in args.methods if m != "peft" or _have_peft()]
    if "peft" in args.methods and "peft" not in methods:
        print("# PEFT is not installed: the PEFT column is skipped", file=sys.stderr)
    torch.set_num_threads(args.threads)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.bf16 and not device.startswith("cuda"):
        raise SystemExit("--bf16 is for CUDA devices only")
    from cpt.labelled_data import load_dataset
    from cpt.pretrained import load_model_and_tokenizer

    base_model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype, device=device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runs_path = output_dir / f"{args.name}_runs.jsonl"
    done = [] if args.fresh else _read_runs(runs_path)
    if args.fresh or not runs_path.is_file():
        runs_path.write_text("")
    done_keys = {_key(r) for r in done}
    records = list(done)
    env = {
        "model": args.model or "smollm2-135m",
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps({"kind": "environment", **env}), flush=True)
    started = time.perf_counter()

    def record(**fields: Any) -> None:
        entry = {**fields, **env}
        records.append(entry)
        done_keys.add(_key(entry))
        line = json.dumps(entry)
        print(line, flush=True)
        with runs_path.open("a") as f:
            f.write(line + "\n")

    template = Template()
    datasets = {name: load_dataset(name) for name in args.datasets}
    print(json.dumps({"kind": "plan", "datasets": args.datasets, "K": args.k, "seeds": args.seeds,
                      "methods": methods, "test": args.test}), flush=True)
    for seed in args.seeds:  # seed-major: an interrupted run still has whole seeds
        for name, data in datasets.items():
            for k in args.k:
                if f"{name}:{k}" in args.skip or f"{name}:{k}:{seed}" in args.skip:
                    continue
                these = list(methods)
                if "peft" in these and (
                    seed not in (args.peft_seeds if args.peft_seeds is not None else args.seeds)
                    or f"{name}:{k}" in args.peft_skip
                ):
                    these.remove("peft")
                run = _Run(args, data, k, seed, base_model, tokenizer, template, these)
                if args.sweep:
                    run.sweep(done_keys, record)
                else:
                    run.evaluate_all(done_keys, record)

    total = time.perf_counter() - started
    print(json.dumps({"kind": "total", "seconds": round(total, 1), "runs": len(records)}), flush=True)
    if args.sweep:
        table = sweep_table(records)
    else:
        table = report(records, methods)
        _plot(records, methods, output_dir / f"{args.name}.png")
    (output_dir / f"{args.name}_table.md").write_text(table)
    print(table)
    return records


class _Run:
    """One (data set, K, seed): the draws, and a method per call."""

    def __init__(self, args, data, k, seed, base_model, tokenizer, template, methods) -> None:  # type: ignore[no-untyped-def]
        from cpt.labelled_data import split_examples

        self.args, self.data, self.k, self.seed = args, data, k, seed
        self.base_model, self.tokenizer, self.template, self.methods = base_model, tokenizer, template, methods
        n_val = args.val if args.sweep else 0
        self.context, self.val, self.test = split_examples(
            data, per_class=k, n_test=args.test, n_train=n_val, seed=seed
        )
        # The library's defaults unless --cpt-lr / --cpt-epochs / --cpt-epsilon say otherwise.
        overrides = {"learning_rate": args.cpt_lr, "epochs": args.cpt_epochs, "max_steps": args.quick_steps}
        self.train_config = TrainConfig(
            seed=seed, progress=False, **{k: v for k, v in overrides.items() if v is not None}
        )
        self.fit_options: dict[str, Any] = {}
        if args.cpt_select is not None:
            self.fit_options["selection"] = None if args.cpt_select == "none" else args.cpt_select
        self.context_options: dict[str, Any] = {}
        if args.cpt_epsilon is not None:
            eps, format_eps = args.cpt_epsilon
            self.context_options = {"opt_projection_epsilon": eps, "opt_projection_format_epsilon": format_eps}
        options = {**CONTEXT_DEFAULTS, **self.context_options}
        self.hyper = {
            "lr": self.train_config.learning_rate,
            "epochs": self.train_config.epochs,
            "epsilon": options["opt_projection_epsilon"],
            "format_epsilon": options["opt_projection_format_epsilon"],
            "selection": self.fit_options.get("selection", "default"),
        }

    def key(self, method: str, k: int | None = None) -> tuple:
        return (self.data.name, self.k if k is None else k, self.seed, method)

    def _score(self, model: CPTModel, examples: Sequence[Example]) -> tuple[float, dict[str, int], float]:
        """Plain accuracy, prediction counts and seconds (the sweep's measure)."""
        scored = self._classify(model, examples, calibrate=False)
        return scored["plain"]["accuracy"], scored["plain"]["predictions"], scored["seconds"]

    def _classify(self, model: CPTModel, examples: Sequence[Example], calibrate: bool = True) -> dict[str, Any]:
        """Scores ``examples`` once; the plain and (if asked) calibrated predictions' measures."""
        started = time.perf_counter()
        result = classify(
            model,
            self.tokenizer,
            [e.text for e in examples],
            self.data.labels,
            template=self.template,
            batch_size=self.args.batch_size,
            calibrate=calibrate,
        )
        seconds = time.perf_counter() - started
        truths = [e.label for e in examples]
        labels = self.data.labels
        plain = [labels[j] for j in result.log_likelihoods.argmax(dim=-1).tolist()]
        scored: dict[str, Any] = {"seconds": seconds, "plain": _measures(plain, truths, labels)}
        if calibrate:
            scored["calibrated"] = _measures(result.predictions, truths, labels)
            scored["calibrated"]["prior"] = [round(p, 4) for p in result.prior.tolist()]
        return scored

    def _common(self, method: str, k: int) -> dict[str, Any]:
        return {"dataset": self.data.name, "K": k, "seed": self.seed, "method": method,
                "n_test": len(self.test), "labels": len(self.data.labels)}

    def _wants(self, method: str, done: set, k: int | None = None) -> bool:
        return method in self.methods and self.key(method, k) not in done

    def evaluate_all(self, done: set, record) -> None:  # type: ignore[no-untyped-def]
        if self._wants("zero-shot", done, 0):
            eos = self.tokenizer.convert_tokens_to_ids(self.tokenizer.eos_token)
            config = CPTConfig(cpt_token_ids=[eos], cpt_tokens_type_mask=[0])  # one separator
            scored = self._classify(CPTModel(self.base_model, config), self.test, calibrate=False)
            record(**self._common("zero-shot", 0), **scored["plain"], seconds=round(scored["seconds"], 2),
                   eval_seconds=round(scored["seconds"], 2), context_tokens=1)
        config = build_context(self.tokenizer, self.context, self.template, **CONTEXT_DEFAULTS)
        n = config.num_virtual_tokens
        if self._wants("icl", done) or self._wants("icl-cal", done):
            scored = self._classify(CPTModel(self.base_model, config), self.test)
            for method, which in (("icl", "plain"), ("icl-cal", "calibrated")):
                if self._wants(method, done):
                    record(**self._common(method, self.k), **scored[which], seconds=round(scored["seconds"], 2),
                           eval_seconds=round(scored["seconds"], 2), context_tokens=n)
        cpt_context = None
        if any(self._wants(m, done) for m in ("cpt", "cpt-cal", "peft")):
            started = time.perf_counter()
            fit_options = dict(self.fit_options)
            if self._wants("peft", done):
                fit_options["selection"] = None  # PEFT has no selection: compare like with like
            model, result = fit(
                self.base_model, self.tokenizer, self.context, template=self.template,
                labels=self.data.labels, train_config=self.train_config, **fit_options, **self.context_options,
            )
            train_seconds = time.perf_counter() - started
            cpt_context = model.context_embeddings().detach()
            if self._wants("cpt", done) or self._wants("cpt-cal", done):
                scored = self._classify(model, self.test)
                history = result.eval_history
                chosen = _chosen_step(history)
                for method, which in (("cpt", "plain"), ("cpt-cal", "calibrated")):
                    if self._wants(method, done):
                        record(**self._common(method, self.k), **scored[which],
                               seconds=round(train_seconds + scored["seconds"], 2),
                               train_seconds=round(train_seconds, 2), eval_seconds=round(scored["seconds"], 2),
                               context_tokens=n, steps=result.steps, selected_step=chosen,
                               first_loss=result.losses[0], final_loss=result.losses[-1],
                               mean_delta_norm=_mean_delta_norm(model), hyper=self.hyper)
            del model
        if self._wants("peft", done):
            started = time.perf_counter()
            model, losses = train_with_peft(
                self.base_model, self.tokenizer, self.context, self.template, self.train_config,
                {**CONTEXT_DEFAULTS, **self.context_options},
            )
            train_seconds = time.perf_counter() - started
            scored = self._classify(model, self.test, calibrate=False)
            rel = (model.context_embeddings() - cpt_context).norm() / cpt_context.norm()
            record(**self._common("peft", self.k), **scored["plain"],
                   seconds=round(train_seconds + scored["seconds"], 2), train_seconds=round(train_seconds, 2),
                   eval_seconds=round(scored["seconds"], 2), context_tokens=n, steps=len(losses),
                   first_loss=losses[0], final_loss=losses[-1], context_rel_diff=float(rel.detach()),
                   hyper=self.hyper)

    def sweep(self, done: set, record) -> None:  # type: ignore[no-untyped-def]
        """CPT's validation accuracy over `SWEEP_LR` x `SWEEP_EPOCHS` x `SWEEP_EPSILON`, and ICL's."""
        if not self.val:
            raise SystemExit("--sweep needs --val > 0 validation examples")
        common = {"dataset": self.data.name, "K": self.k, "seed": self.seed, "n_val": len(self.val)}
        if ("icl",) + self.key("")[:3] not in done:
            config = build_context(self.tokenizer, self.context, self.template, **CONTEXT_DEFAULTS)
            accuracy, counts, _ = self._score(CPTModel(self.base_model, config), self.val)
            record(**common, method="icl", lr=None, epochs=0, epsilon=None, format_epsilon=None,
                   val_accuracy=accuracy, predictions=counts)
        for lr in self.args.sweep_lr:
            for epochs in self.args.sweep_epochs:
                for eps, format_eps in self.args.sweep_epsilon:
                    key = (self.data.name, self.k, self.seed, f"cpt:{lr}:{epochs}:{eps}:{format_eps}")
                    if key in done:
                        continue
                    started = time.perf_counter()
                    model, result = fit(
                        self.base_model, self.tokenizer, self.context, template=self.template,
                        labels=self.data.labels,
                        train_config=replace(self.train_config, learning_rate=lr, epochs=epochs),
                        opt_projection_epsilon=eps, opt_projection_format_epsilon=format_eps,
                        **self.fit_options,
                    )
                    accuracy, counts, _ = self._score(model, self.val)
                    record(**common, method="cpt", lr=lr, epochs=epochs, epsilon=eps,
                           format_epsilon=format_eps, val_accuracy=accuracy,
                           final_loss=result.losses[-1], mean_delta_norm=_mean_delta_norm(model),
                           seconds=round(time.perf_counter() - started, 2), predictions=counts)


def train_with_peft(
    base_model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    template: Template,
    train_config: TrainConfig,
    context_options: dict[str, Any],
) -> tuple[CPTModel, list[float]]:
    """Trains PEFT's CPT on ``examples`` as `cpt.fit` would, and loads the result as a `CPTModel`.

    Same context (`build_context`), same samples (`CPTDataset` of the context's examples, padded by
    `CPTCollator`), same per-epoch order (`epoch_order`), AdamW with the same learning rate and
    weight decay, the same gradient clipping, a constant learning rate. PEFT runs on a deep copy
    of ``base_model``; its adapter goes through PEFT's ``save_pretrained`` and
    ``CPTModel.from_pretrained`` (PEFT's layout: base + projected delta).

    Returns:
        ``(model, losses)``: a `CPTModel` on ``base_model`` and the loss of every step.
    """
    import peft

    if train_config.gradient_accumulation_steps != 1 or train_config.max_steps is not None:
        raise ValueError("train_with_peft follows epochs with no gradient accumulation")
    config = build_context(tokenizer, examples, template, **context_options)
    fields = {k: v for k, v in config.to_dict().items() if k != "num_virtual_tokens"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(base_model), peft.CPTConfig(**fields))
    peft_model.eval()  # the frozen model: no dropout, as cpt's train() does
    delta = peft_model.prompt_encoder["default"].delta_embedding.weight
    optimizer = torch.optim.AdamW([delta], lr=train_config.learning_rate, weight_decay=train_config.weight_decay)
    dataset = CPTDataset(tokenizer, examples, template)
    collator = CPTCollator(tokenizer.pad_token_id)
    device = delta.device
    torch.manual_seed(train_config.seed)
    losses: list[float] = []
    size = train_config.batch_size
    for epoch in range(train_config.epochs):
        order = epoch_order(len(dataset), train_config.seed, epoch)
        for start in range(0, len(order), size):
            batch = collator([dataset[i] for i in order[start : start + size]])
            batch = {k: v.to(device) for k, v in batch.items()}  # PEFT shifts input_type_mask in place
            optimizer.zero_grad(set_to_none=True)
            loss = peft_model(**batch).loss
            loss.backward()
            if train_config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([delta], train_config.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)  # PEFT projects delta when it saves
        model = CPTModel.from_pretrained(base_model, folder)
    del peft_model
    return model, losses


def _mean_delta_norm(model: CPTModel) -> float:
    """Mean L2 norm of delta over the trainable rows (how far training moved the context)."""
    rows = model.context.trainable_rows.squeeze(1)
    return float(model.delta.detach()[rows].norm(dim=1).mean()) if bool(rows.any()) else 0.0


def _measures(predictions: list[str], truths: list[str], labels: Sequence[str]) -> dict[str, Any]:
    return {"accuracy": accuracy(predictions, truths), "macro_f1": macro_f1(predictions, truths, labels),
            "predictions": dict(Counter(predictions))}


def _chosen_step(history: list[dict[str, float]]) -> int | None:
    """The step whose context fit's selection kept (None without selection)."""
    scored = [h for h in history if "loo_log_prob" in h]
    if not scored:
        return None
    best = max(h["loo_log_prob"] for h in scored)
    return int(next(h["step"] for h in scored if h["loo_log_prob"] == best))


# ---------------------------------------------------------------------- output


def _key(record: dict[str, Any]) -> tuple:
    method = record["method"]
    if "lr" in record and method == "cpt":
        method = f"cpt:{record['lr']}:{record['epochs']}:{record['epsilon']}:{record['format_epsilon']}"
    if "n_val" in record and method == "icl":
        return ("icl", record["dataset"], record["K"], record["seed"])
    return (record["dataset"], record["K"], record["seed"], method)


def _read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def _accuracies(records: list[dict[str, Any]], dataset: str, k: int, method: str, metric: str = "accuracy") -> list[float]:
    return [r[metric] for r in records if r["dataset"] == dataset and r["K"] == k and r["method"] == method and metric in r]


def markdown_table(records: list[dict[str, Any]], methods: Sequence[str], metric: str = "accuracy") -> str:
    """Mean ± sample standard deviation (over seeds) of ``metric``, in %, per (data set, K).

    Zero-shot (K = 0) is shown on every K row of its data set.
    """
    runs = [r for r in records if metric in r]
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    ks = sorted({r["K"] for r in runs if r["K"] > 0})
    header = "| data set | K | " + " | ".join(METHOD_NAMES[m] for m in methods) + " | seeds | test |"
    lines = [header, "|" + "---|" * (len(methods) + 4)]
    for dataset in datasets:
        for k in ks:
            cells = []
            for method in methods:
                cells.append(_mean_std(_accuracies(runs, dataset, 0 if method == "zero-shot" else k, method, metric)))
            these = [r for r in runs if r["dataset"] == dataset and r["K"] == k]
            if not these:
                continue
            seeds = len({r["seed"] for r in these})
            n_test = these[0]["n_test"]
            lines.append(f"| {dataset} | {k} | " + " | ".join(cells) + f" | {seeds} | {n_test} |")
    return "\n".join(lines) + "\n"


def targets(records: list[dict[str, Any]]) -> str:
    """The issue's targets, measured on the cells (data set, K) where CPT and ICL both ran.

    A cell's difference is the mean over its seeds of CPT's accuracy minus the other method's on
    the same seed (seeds where only one of the two ran are left out), in accuracy points.
    """
    runs = [r for r in records if "accuracy" in r]
    by_key = {(r["dataset"], r["K"], r["seed"], r["method"]): r["accuracy"] for r in runs}
    cells = sorted({(r["dataset"], r["K"]) for r in runs if r["method"] == "cpt"})

    def paired(dataset: str, k: int, method: str) -> float | None:
        return _mean([cpt - by_key[(d, kk, s, method)] for (d, kk, s, m), cpt in by_key.items()
                      if (d, kk, m) == (dataset, k, "cpt") and (d, kk, s, method) in by_key])

    rows = []
    for dataset, k in cells:
        against_icl = paired(dataset, k, "icl")
        if against_icl is None:
            continue
        labels = next((r.get("labels") for r in runs if r["dataset"] == dataset and "labels" in r), None)
        rows.append((dataset, k, labels, against_icl, paired(dataset, k, "icl-cal")))
    if not rows:
        return "No cell has both CPT and ICL.\n"
    gains = [r[3] for r in rows]
    worst = min(rows, key=lambda r: r[3])
    against_cal = [r[4] for r in rows if r[4] is not None]
    binary = [r[3] for r in rows if r[2] == 2]
    lines = [
        f"Over {len(rows)} cells (data set, K); accuracy points, CPT minus the other method on the same seeds.",
        "",
        "| measure | target | measured |",
        "|---|---|---|",
        f"| CPT - ICL, mean over cells | >= +10 | {100 * statistics.fmean(gains):+.1f} |",
        f"| worst cell, CPT - ICL | >= -2 | {100 * worst[3]:+.1f} ({worst[0]}, K = {worst[1]}) |",
        f"| CPT - calibrated ICL, mean | > 0 | "
        + (f"{100 * statistics.fmean(against_cal):+.1f}" if against_cal else "-") + " |",
        f"| two-class sets, CPT - ICL, worst cell | >= +5 | "
        + (f"{100 * min(binary):+.1f} (mean {100 * statistics.fmean(binary):+.1f})" if binary else "-") + " |",
    ]
    return "\n".join(lines) + "\n"


PAIRED = (("icl", "ICL"), ("icl-cal", "ICL+cal"), ("zero-shot", "zero-shot"))
"""What `paired_table` compares CPT with."""


def paired_table(records: list[dict[str, Any]], metric: str = "accuracy") -> str:
    """CPT's ``metric`` minus each baseline's on the same seed (same test set, same context), in
    points: mean ± std over the seeds where both ran, and on how many seeds CPT was ahead; then
    the mean of the cells' means per K and over every cell."""
    runs = [r for r in records if metric in r]
    by_key = {(r["dataset"], r["K"], r["seed"], r["method"]): r[metric] for r in runs}
    order = {name: i for i, name in enumerate(dict.fromkeys(r["dataset"] for r in runs))}
    cells = sorted({(r["dataset"], r["K"]) for r in runs if r["method"] == "cpt"}, key=lambda c: (order[c[0]], c[1]))
    header = "| data set | K | " + " | ".join(f"CPT - {name}" for _, name in PAIRED) + " | CPT ahead of ICL |"
    lines = [header, "|" + "---|" * (len(PAIRED) + 3)]
    means: dict[str, list[tuple[int, float]]] = {method: [] for method, _ in PAIRED}
    for dataset, k in cells:
        seeds = sorted(seed for (d, kk, seed, m) in by_key if (d, kk, m) == (dataset, k, "cpt"))
        columns = []
        for method, _ in PAIRED:
            base_k = 0 if method == "zero-shot" else k
            diffs = [by_key[(dataset, k, s, "cpt")] - by_key[(dataset, base_k, s, method)]
                     for s in seeds if (dataset, base_k, s, method) in by_key]
            columns.append(_signed_mean_std(diffs))
            if diffs:
                means[method].append((k, statistics.fmean(diffs)))
        icl = [by_key[(dataset, k, s, "cpt")] - by_key[(dataset, k, s, "icl")] for s in seeds if (dataset, k, s, "icl") in by_key]
        ahead = f"{sum(d > 0 for d in icl)} of {len(icl)}" if icl else "-"
        lines.append(f"| {dataset} | {k} | " + " | ".join(columns) + f" | {ahead} |")
    for k in sorted({k for _, k in cells}) + [None]:
        name = "all cells" if k is None else f"mean over sets, K = {k}"
        columns = []
        for method, _ in PAIRED:
            values = [m for kk, m in means[method] if k is None or kk == k]
            columns.append(_signed_mean_std([statistics.fmean(values)]) if values else "-")
        lines.append(f"| {name} | | " + " | ".join(columns) + " | |")
    return "\n".join(lines) + "\n"


def _signed_mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = round(100 * statistics.fmean(values), 1) + 0.0  # no "-0.0"
    return f"{mean:+.1f}" if len(values) == 1 else f"{mean:+.1f} ± {100 * statistics.stdev(values):.1f}"


def report(records: list[dict[str, Any]], methods: Sequence[str]) -> str:
    """Accuracy and macro-F1 tables, CPT's paired gains and the targets, in markdown."""
    return (
        "### Accuracy (%)\n\n" + markdown_table(records, methods)
        + "\n### Macro-F1 (%)\n\n" + markdown_table(records, methods, "macro_f1")
        + "\n### CPT against each baseline, seed by seed (accuracy points)\n\n" + paired_table(records)
        + "\n### The same in macro-F1 points\n\n" + paired_table(records, "macro_f1")
        + "\n### Targets\n\n" + targets(records)
    )


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def sweep_table(records: list[dict[str, Any]]) -> str:
    """Validation accuracy (%) of every swept setting, mean over seeds, per (data set, K)."""
    runs = [r for r in records if "val_accuracy" in r]
    groups: dict[tuple, list[float]] = {}
    for r in runs:
        setting = "ICL" if r["method"] == "icl" else f"lr {r['lr']:g}, {r['epochs']} ep, eps {r['epsilon']:g}/{r['format_epsilon']:g}"
        groups.setdefault((r["dataset"], r["K"], setting), []).append(r["val_accuracy"])
    lines = ["| data set | K | setting | validation accuracy | seeds |", "|---|---|---|---|---|"]
    for (dataset, k, setting), values in groups.items():
        lines.append(f"| {dataset} | {k} | {setting} | {_mean_std(values)} | {len(values)} |")
    return "\n".join(lines) + "\n"


def _plot(records: list[dict[str, Any]], methods: Sequence[str], path: Path) -> Path | None:
    """Bar chart of mean accuracy (± std) by data set and method, one panel per K."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no plot", file=sys.stderr)
        return None
    runs = [r for r in records if "accuracy" in r]
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    ks = sorted({r["K"] for r in runs if r["K"] > 0})
    if not ks or not datasets:
        return None
    fig, axes = plt.subplots(1, len(ks), figsize=(5.5 * len(ks), 4), sharey=True, squeeze=False)
    width = 0.8 / len(methods)
    for ax, k in zip(axes[0], ks):
        for i, method in enumerate(methods):
            means, stds = [], []
            for dataset in datasets:
                values = _accuracies(runs, dataset, 0 if method == "zero-shot" else k, method)
                means.append(100 * statistics.fmean(values) if values else math.nan)
                stds.append(100 * statistics.stdev(values) if len(values) > 1 else 0.0)
            positions = [d + (i - (len(methods) - 1) / 2) * width for d in range(len(datasets))]
            ax.bar(positions, means, width, yerr=stds, capsize=2, label=METHOD_NAMES[method])
        ax.set_xticks(range(len(datasets)), datasets, rotation=15)
        ax.set_title(f"K = {k} examples per class")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(methods), frameon=False)
    model = runs[0].get("model", "")
    fig.suptitle(f"{model}: mean ± std over seeds (zero-shot: no examples)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _have_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description="Test accuracy of zero-shot, ICL, CPT (cpt.fit) and PEFT's CPT on StaICC data "
        "with the default model (SmolLM2-135M), K examples per class as the context.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--half", choices=list(HALVES), default="report",
                        help=f"which sets: dev = {' '.join(DEV_SETS)}; report = {' '.join(REPORT_SETS)}")
    parser.add_argument("--datasets", nargs="+", default=None, help="built-in names or .jsonl/.csv files (default: those of --half)")
    parser.add_argument("--k", type=int, nargs="+", default=None, help="examples per class in the context (default: 1 2 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds; each draws its own test set and context (default: 0 1 2 3 4)")
    parser.add_argument("--test", type=int, default=None, help="held-out test examples per seed (default: 100)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS), help="what to run")
    parser.add_argument("--model", default=None, help="model folder or hub name (default: SmolLM2-135M)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--bf16", action="store_true", help="load the model in bfloat16 (CUDA only)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass when scoring")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: leave the other cores to others)")
    parser.add_argument("--output-dir", default="docs", help="where the JSONL, markdown and PNG go")
    parser.add_argument("--name", default=None, help="file name prefix (default: accuracy_<half>, accuracy_quick or accuracy_sweep)")
    parser.add_argument("--fresh", action="store_true", help="start <name>_runs.jsonl over (default: keep it and skip the runs in it)")
    parser.add_argument("--resume", action="store_true", help="the default; kept for older commands")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the first set, K=1, seed 0, 8 test examples, 2 training steps (with a tiny --model: seconds)")
    parser.add_argument("--sweep", action="store_true", help="validation sweep of CPT's lr / epochs / epsilon instead (no test set scored)")
    parser.add_argument("--val", type=int, default=100, help="validation examples for --sweep, drawn outside the test set and context")
    parser.add_argument("--sweep-lr", type=float, nargs="+", default=SWEEP_LR, help="--sweep: learning rates")
    parser.add_argument("--sweep-epochs", type=int, nargs="+", default=SWEEP_EPOCHS, help="--sweep: epochs")
    parser.add_argument("--sweep-epsilon", type=_epsilons, nargs="+", default=[_epsilons(e) for e in SWEEP_EPSILON],
                        help="--sweep: INPUT/FORMAT epsilon pairs (at d = 2048), e.g. 0.2/0.1")
    parser.add_argument("--cpt-lr", type=float, default=None, help="CPT and PEFT learning rate (None: TrainConfig's)")
    parser.add_argument("--cpt-epochs", type=int, default=None, help="CPT and PEFT epochs (None: TrainConfig's)")
    parser.add_argument("--cpt-epsilon", type=_epsilons, default=None, metavar="INPUT/FORMAT",
                        help="CPT and PEFT epsilons at d = 2048 (None: fit's)")
    parser.add_argument("--cpt-select", choices=["leave-one-out", "none"], default=None,
                        help="CPT's selection of the trained context (None: fit's default)")
    parser.add_argument("--peft-seeds", type=int, nargs="+", default=None, help="seeds that also run PEFT (default: all)")
    parser.add_argument("--peft-skip", nargs="+", default=[], metavar="DATASET:K", help="cells where PEFT is not run")
    parser.add_argument("--skip", nargs="+", default=[], metavar="DATASET:K[:SEED]",
                        help="cells (of every seed, or of one seed) not run at all; zero-shot runs with the first K not skipped")
    return parser


def _epsilons(text: str) -> tuple[float, float]:
    try:
        eps, format_eps = (float(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected INPUT/FORMAT, e.g. 0.2/0.1, got {text!r}") from None
    return eps, format_eps


if __name__ == "__main__":
    main()
