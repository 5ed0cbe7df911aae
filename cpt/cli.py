"""The ``cpt`` command: ``demo``, ``train``, ``eval``, ``predict`` and ``generate``.

Bad input (a bad option value, a missing file, a malformed line, an unknown model, a label
outside the label set, a context too long for the model) ends with one line on stderr and exit
status 2, no traceback; a bug in `cpt` keeps its traceback (see `_user_problem`). Adapters are
written file by file to a temporary name and renamed, so none is ever half written.
``cpt --help`` and ``cpt --version`` import neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import inspect
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from cpt._fields import check_distinct, check_text, text_problem  # light: no torch

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
TERMINATED = 143  # 128 + SIGTERM
BROKEN_PIPE = 141  # as a process that SIGPIPE ended (Python ignores the signal and raises instead)

DTYPES = ("float32", "bfloat16", "float16", "auto")
"""``--dtype`` values: torch dtype names, or ``auto`` for the checkpoint's own."""

DEFAULT_CHECKPOINT_EVERY = 10
"""Steps between checkpoints when ``--checkpoint-dir`` is given without ``--checkpoint-every``."""

DEFAULT_TEST = 200
"""``--test``: held-out examples, enough to tell accuracies apart by a few points."""

DEFAULT_MAX_NEW_TOKENS = 20
"""``cpt generate --max-new-tokens``."""

NO_SELECTION = "none"
"""``--selection none``: `cpt.workflow.fit`'s ``selection=None`` (the last context)."""
# The other options' defaults are the library's (`TrainConfig`, `Template`, `CONTEXT_DEFAULTS`,
# ...), read when a command's arguments are made (`_Parser`).


class CLIError(Exception):
    """A problem with the user's input, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as one line (``cpt train: error: ...``) with exit status 2.

    Each parser reports its own unknown arguments: argparse hands a subcommand's leftovers up to
    the top parser, whose message would name ``cpt`` instead of ``cpt train``.

    A command's arguments are added by ``arguments(parser)`` when the command is first parsed or
    its help shown: their defaults are read from the library, which imports torch, so ``cpt
    --help`` and ``cpt --version`` stay light.
    """

    def __init__(self, *args: Any, arguments: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._arguments = arguments

    def _add_arguments(self) -> None:
        if self._arguments is not None:
            arguments, self._arguments = self._arguments, None
            arguments(self)

    def format_usage(self) -> str:
        self._add_arguments()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_arguments()
        return super().format_help()

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def, override]
        self._add_arguments()
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            shown = " ".join(extra if extra.isprintable() else repr(extra) for extra in extras)
            self.error(f"unrecognized arguments: {shown}")
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, except where there is nothing to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        nothing = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if nothing or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    try:
        callers_group = _in_process_group()  # `main` called from a script that joined one itself
        with _quiet_libraries(f"cpt {args.command}"), _terminate_as_interrupt():
            status = args.run(args)
        if not callers_group:
            _leave_process_group()
        return status
    except Terminated:
        print(f"cpt {args.command}: terminated", file=sys.stderr)
        return TERMINATED
    except KeyboardInterrupt:
        print(f"cpt {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # the reader of stdout left (`cpt predict ... | head -1`): nothing to say
        _drop_stdout()
        return BROKEN_PIPE
    except Exception as error:
        message = _user_problem(error)
        if message is None:
            raise  # a bug in cpt: its traceback is what a report needs
        print(f"cpt {args.command}: error: {message}", file=sys.stderr)
        return USAGE_ERROR


def _in_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")  # not imported: no group either
    return dist is not None and dist.is_available() and dist.is_initialized()


def _leave_process_group() -> None:
    """Under ``torchrun``, leaves the process group the command joined (`cpt.distributed.leave`),
    once the command succeeded on this rank; a failed rank exits without waiting for the others."""
    if _in_process_group():
        from cpt import distributed

        distributed.leave()


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``), raised like Ctrl-C's KeyboardInterrupt so that the same clean-up runs."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turns SIGTERM into `Terminated` for the block (main thread only), instead of an exit that
    runs no clean-up and leaves a save's temporary folder behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is None:
        yield
        return

    def terminate(number: int, frame: Any) -> NoReturn:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _user_problem(error: Exception) -> str | None:
    """The one-line message of an exception the user can act on; None for a bug.

    The user's: `CLIError`; ``ValueError``, the library's refusal of bad input; ``ImportError``, a
    missing package; ``OSError``, a file system or network refusal (a missing or unreadable file,
    a read-only folder, a full disk, an unreachable hub); and running out of memory (host or GPU).
    Anything else (``TypeError``, ``AttributeError``, ``RuntimeError``, ...) is a bug.
    """
    if isinstance(error, (CLIError, ValueError, ImportError, OSError)):
        return _one_line(error)
    torch = sys.modules.get("torch")  # imported by then if its memory ran out
    if isinstance(error, MemoryError) or (torch is not None and isinstance(error, torch.OutOfMemoryError)):
        return f"out of memory: {_one_line(error)}"
    return None


def _drop_stdout() -> None:
    """Points stdout at the null device, so that the interpreter's last flush meets no closed pipe."""
    with contextlib.suppress(OSError, ValueError):  # a stdout without a file descriptor: nothing to do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _one_line(message: object) -> str:
    """``message`` as one line (an exception with no message gives its type's name)."""
    text = " ".join(str(message).split())
    return text or type(message).__name__


class _OneLineFormatter(logging.Formatter):
    """Formats a log record as one line."""

    def format(self, record: logging.LogRecord) -> str:
        return _one_line(super().format(record))


@contextlib.contextmanager
def _quiet_libraries(prog: str) -> Iterator[None]:
    """While a command runs, stderr carries only its own progress bars, errors and warnings.

    Everything is put back on exit, so `main` called from Python changes nothing for its caller.
    """
    with _warnings_as_lines(prog), _transformers_quiet():  # warnings first: importing transformers may warn
        yield


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """`transformers` and the hub draw no progress bars and log errors only (its load reports
    and tokenizer length notes are for library users; the GGUF converter's bar follows the same
    switch, see `cpt.pretrained`). ``TRANSFORMERS_VERBOSITY``, when set, keeps its logging as asked."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if not os.environ.get("TRANSFORMERS_VERBOSITY"):
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _warnings_as_lines(prog: str) -> Iterator[None]:
    """`cpt`'s own warnings (`CPTWarning`) and its log records of level WARNING print as one line
    each, ``cpt train: warning: ...``; the Python warnings of torch, `transformers` and the other
    libraries are dropped: they speak of code the user did not write. With ``python -W ...`` or
    ``PYTHONWARNINGS``, Python's own warning filters and format stay in force."""
    from cpt.warning import CPTWarning

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        print(f"{prog}: warning: {_one_line(message)}", file=sys.stderr)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(f"{prog}: warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    cpt_logger = logging.getLogger("cpt")
    propagate = cpt_logger.propagate
    cpt_logger.addHandler(handler)
    cpt_logger.propagate = False  # printed here, not also by a handler of the root logger
    try:
        with warnings.catch_warnings():
            if not sys.warnoptions:
                warnings.simplefilter("ignore")
                warnings.filterwarnings("default", category=CPTWarning)
                warnings.showwarning = show
            yield
    finally:
        cpt_logger.propagate = propagate
        cpt_logger.removeHandler(handler)


def version_line() -> str:
    """``cpt X (torch Y, transformers Z)``, read from the installed metadata without importing."""

    def installed(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    from cpt import __version__

    return f"cpt {__version__} (torch {installed('torch')}, transformers {installed('transformers')})"


# ---------------------------------------------------------------------- value types


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _seed(text: str) -> int:
    """A ``--seed``: an integer in [0, 2**64 - 1], the seeds every generator takes (`cpt._fields.MAX_SEED`)."""
    from cpt._fields import MAX_SEED

    value = _int_at_least(0)(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be <= 2**64 - 1, got {value}")
    return value


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    try:
        check_distinct(names, "the list")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    problem = text_problem(text)
    if problem is not None:  # bytes that are not UTF-8 arrive as lone surrogates
        raise argparse.ArgumentTypeError(f"the list {problem}")
    return names


# ---------------------------------------------------------------------- arguments


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cpt",
        description="Context-aware Prompt Tuning (arXiv 2410.17222) for Hugging Face causal LMs.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], **kwargs: Any) -> None:
        commands.add_parser(name, formatter_class=HelpFormatter, **kwargs).set_defaults(run=run)

    command(
        "demo", _run_demo, arguments=_demo_args,
        help="ICL vs CPT on rotten_tomatoes with the default model, in a few minutes on a CPU",
        description="Draws a few examples per class as the context, measures in-context learning "
        "on held-out reviews, trains the context with CPT on those same examples, measures again, "
        "and saves the adapter.",
    )
    command(
        "train", _run_train, arguments=_train_command_args,
        help="train a CPT context on labelled data and save the adapter",
        description="Builds the context from --per-class examples of each label drawn with the seed "
        "(or from --context, a file of its own), trains it, and saves the adapter to --output. "
        "With --checkpoint-dir, training state is saved every --checkpoint-every steps, and "
        "--resume continues an interrupted run from it (same data, seed and options).",
    )
    command(
        "eval", _run_eval, arguments=_eval_args,
        help="accuracy of an adapter on labelled data",
        description="Scores --test examples drawn with the seed (excluding none: use data the adapter "
        "was not trained on) and prints the accuracy as JSON.",
    )
    command(
        "predict", _run_predict, arguments=_predict_args,
        help="classify texts with a trained adapter",
        description="Prints one JSON line per text: the predicted label and each label's probability.",
    )
    command(
        "generate", _run_generate, arguments=_generate_args,
        help="generate text after a trained adapter's context",
        description="Prints one JSON line per text: the text the model writes after the trained "
        "context and the text's query (greedy unless --temperature is above 0).",
    )
    return parser


def _defaults(function: Callable[..., Any]) -> dict[str, Any]:
    """The defaults of ``function``'s parameters (or of a dataclass's fields, read from its
    ``__init__``): the command line shows and uses the library's own, never a copy."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def _demo_args(demo: argparse.ArgumentParser) -> None:
    _model_args(demo)
    demo.add_argument("--data", default="rotten_tomatoes", help="built-in dataset or .jsonl/.csv file")
    _label_names_arg(demo)
    _per_class_arg(demo, minimum=1)
    _test_arg(demo, minimum=1, help="held-out examples to score")
    demo.add_argument("--output", type=_output_path, default=Path("cpt-demo-adapter"), help="adapter folder")
    _seed_arg(demo, help="seed of the draws and of training")
    _train_args(demo)


def _train_command_args(train: argparse.ArgumentParser) -> None:
    from cpt.config import EPSILON_REFERENCE_DIM, LOSS_TYPES
    from cpt.data import Template
    from cpt.workflow import CONTEXT_DEFAULTS

    template, context = _defaults(Template), CONTEXT_DEFAULTS
    _model_args(train)
    _data_args(train)
    _per_class_arg(train, minimum=0)
    train.add_argument("--context", help="a .jsonl/.csv file holding exactly the context's examples")
    train.add_argument("--train", type=_int_at_least(0), default=0, help="extra training examples beyond the context")
    _test_arg(train, minimum=0, help="examples held out (never trained on) for `cpt eval` with the same --data and --seed")
    train.add_argument("--output", type=_output_path, required=True, help="adapter folder to write")
    train.add_argument("--input-template", default=template["input_template"], help="text around the input; one {}")
    train.add_argument("--output-template", default=template["output_template"], help="text around the label; one {}")
    train.add_argument(
        "--separator", default=template["intra_separator"],
        help=f"between input and output parts (default: {template['intra_separator']!r})",
    )
    train.add_argument(
        "--epsilon", type=float, default=context["opt_projection_epsilon"],
        help=f"L2 radius of input rows (d = {EPSILON_REFERENCE_DIM})",
    )
    train.add_argument(
        "--format-epsilon", type=float, default=context["opt_projection_format_epsilon"],
        help="L2 radius of template rows",
    )
    train.add_argument(
        "--loss", choices=LOSS_TYPES, default=context["opt_weighted_loss_type"], help="label loss weighting"
    )
    train.add_argument(
        "--decay", type=float, default=context["opt_loss_decay_factor"], help="decay factor of older examples"
    )
    _train_args(train)
    train.add_argument("--checkpoint-dir", type=_output_path, help="folder for training checkpoints (DIR/last)")
    train.add_argument(
        "--checkpoint-every", type=_int_at_least(1), default=None,
        help=f"steps between checkpoints (with --checkpoint-dir; default {DEFAULT_CHECKPOINT_EVERY})",
    )
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    train.add_argument(
        "--shard-base-model", action="store_true",
        help="under torchrun: shard the frozen decoder layers across the processes (FSDP2)",
    )


def _eval_args(evaluate: argparse.ArgumentParser) -> None:
    _model_args(evaluate)
    _data_args(evaluate)
    evaluate.add_argument("--adapter", required=True, help="adapter folder (from cpt train) or hub name")
    _test_arg(evaluate, minimum=1, help="examples to score")
    _scoring_args(evaluate)


def _predict_args(predict: argparse.ArgumentParser) -> None:
    _model_args(predict)
    predict.add_argument("--adapter", required=True, help="adapter folder or hub name")
    predict.add_argument(
        "--labels", type=_names, default=None,
        help="comma-separated candidate labels (default: the adapter's label set)",
    )
    _scoring_args(predict)
    predict.add_argument("texts", nargs="+", help="texts to classify")


def _generate_args(generate: argparse.ArgumentParser) -> None:
    _model_args(generate)
    generate.add_argument("--adapter", required=True, help="adapter folder or hub name")
    generate.add_argument(
        "--max-new-tokens", type=_int_at_least(1), default=DEFAULT_MAX_NEW_TOKENS, help="tokens to generate per text"
    )
    generate.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    _seed_arg(generate, help="seed of the sampling")
    _progress_arg(generate)
    generate.add_argument("texts", nargs="+", help="texts to continue")


def _model_args(parser: argparse.ArgumentParser) -> None:
    from cpt.pretrained import MODEL_ENV, SOURCE_GGUF, SOURCE_PACKAGE

    parser.add_argument(
        "--model", default=None,
        help=f"model folder, .gguf file or hub name (default: ${MODEL_ENV}, else {SOURCE_GGUF} from {SOURCE_PACKAGE})",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the base model's parameter dtype")


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="built-in dataset name or a .jsonl/.csv file")
    _label_names_arg(parser)
    _seed_arg(parser, help="seed of the draws and of training")


def _seed_arg(parser: argparse.ArgumentParser, help: str) -> None:
    from cpt.train import TrainConfig

    parser.add_argument("--seed", type=_seed, default=_defaults(TrainConfig)["seed"], help=help)


def _per_class_arg(parser: argparse.ArgumentParser, minimum: int) -> None:
    from cpt.workflow import SELECTION_MIN_PER_LABEL

    parser.add_argument(  # by default the fewest with which fit can select by leave-one-out
        "--per-class", type=_int_at_least(minimum), default=SELECTION_MIN_PER_LABEL, help="context examples per label"
    )


def _test_arg(parser: argparse.ArgumentParser, minimum: int, help: str) -> None:
    parser.add_argument("--test", type=_int_at_least(minimum), default=DEFAULT_TEST, help=help)


def _label_names_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--label-names", type=_names, default=None,
        help="comma-separated names of the integer labels 0, 1, ... of --data (a ClassLabel's names)",
    )


def _train_args(parser: argparse.ArgumentParser) -> None:
    from cpt.config import ADAPTER_FORMATS
    from cpt.model import CPTModel
    from cpt.train import TrainConfig
    from cpt.workflow import DEFAULT_SELECTION, SELECTION_POINTS, SELECTIONS

    config = _defaults(TrainConfig)
    parser.add_argument("--epochs", type=int, default=config["epochs"], help="passes over the training examples")
    parser.add_argument(
        "--max-steps", type=_int_at_least(1), default=None, help="exact number of optimizer steps (overrides --epochs)"
    )
    parser.add_argument("--lr", type=float, default=config["learning_rate"], help="AdamW learning rate")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=config["batch_size"], help="samples per step")
    parser.add_argument(
        "--format", choices=ADAPTER_FORMATS, default=_defaults(CPTModel.save_pretrained)["format"],
        help="the adapter's layout (peft: PEFT's, without the label set)",
    )
    parser.add_argument(
        "--selection", choices=(*SELECTIONS, NO_SELECTION), default=DEFAULT_SELECTION or NO_SELECTION,
        help=f"the context kept: the best of the untrained one and {SELECTION_POINTS} points of the run by "
        f"leave-one-out over the context's examples (with 2 or more per label), or the last ({NO_SELECTION})",
    )
    _progress_arg(parser)


def _scoring_args(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--no-progress`` and ``--calibrate`` of ``eval`` and ``predict``."""
    from cpt.calibration import CONTENT_FREE_INPUTS
    from cpt.infer import classify

    parser.add_argument(
        "--batch-size", type=_int_at_least(1), default=_defaults(classify)["batch_size"], help="texts per forward pass"
    )
    _progress_arg(parser)
    shown = ", ".join(json.dumps(text) for text in CONTENT_FREE_INPUTS)
    parser.add_argument(
        "--calibrate", action="store_true",
        help=f"divide label probabilities by those of content-free inputs ({shown}) first",
    )


def _progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


# ---------------------------------------------------------------------- commands


def _run_demo(args: argparse.Namespace) -> int:
    from cpt.data import Template, build_context
    from cpt.labelled_data import split_examples
    from cpt.infer import classify
    from cpt.model import CPTModel
    from cpt.pretrained import DEFAULT_MODEL, MODEL_ENV
    from cpt.workflow import CONTEXT_DEFAULTS, fit

    _preflight(args)  # before the data and the model load
    started = time.perf_counter()
    data = _load_data(args.data, args.label_names)
    model, tokenizer, device = _load_model(args)
    context, _, test = split_examples(data, per_class=args.per_class, n_test=args.test, seed=args.seed)
    texts, gold = [e.text for e in test], [e.label for e in test]
    template = Template()
    name = args.model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    print(f"model: {name} on {device}; data: {data.name}, labels {data.labels}")
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
        model, tokenizer, context, template=template, labels=data.labels, train_config=_train_config(args),
        selection=_selection(args),
    )
    train_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    cpt_accuracy = _accuracy(classify(cpt_model, tokenizer, texts, data.labels, template=template).predictions, gold)
    rows.append((f"CPT ({result.steps} steps, {train_time:.0f} s training)", cpt_accuracy, time.perf_counter() - t0))
    print(f"CPT accuracy: {cpt_accuracy:.1%}")
    cpt_model.save_pretrained(args.output, format=args.format)

    print()
    print("| method | accuracy | scoring time |")
    print("|---|---|---|")
    for row_name, accuracy, seconds in rows:
        print(f"| {row_name} | {accuracy:.1%} | {seconds:.1f} s |")
    print()
    print(f"adapter saved to {args.output}; total {time.perf_counter() - started:.0f} s")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from cpt.data import Template, build_context
    from cpt.labelled_data import load_dataset, split_examples
    from cpt.train import LAST_CHECKPOINT_NAME
    from cpt.workflow import fit

    _preflight(args)  # before the data and the model load
    if (args.resume or args.checkpoint_every) and args.checkpoint_dir is None:
        option = "--resume" if args.resume else "--checkpoint-every"
        raise CLIError(f"{option} needs --checkpoint-dir")
    resume_from = None
    if args.resume:
        resume_from = args.checkpoint_dir / LAST_CHECKPOINT_NAME
        if not resume_from.is_dir():
            raise CLIError(f"--resume: no checkpoint to resume in {args.checkpoint_dir} ({resume_from} is missing)")
    data = _load_data(args.data, args.label_names)
    if args.context is not None:  # an empty name is a file that does not exist, not "no --context"
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
    context_tokens = build_context(tokenizer, context, template).num_virtual_tokens
    _check_fits(model, context_tokens, tokenizer, template, [e.text for e in training], data.labels)
    checkpoint_every = args.checkpoint_every or (DEFAULT_CHECKPOINT_EVERY if args.checkpoint_dir else None)
    cpt_model, result = fit(
        model,
        tokenizer,
        context,
        template=template,
        train_examples=training,
        labels=data.labels,
        train_config=_train_config(args, checkpoint_every=checkpoint_every),
        checkpoint_dir=args.checkpoint_dir,
        resume_from=resume_from,
        selection=_selection(args),
        opt_projection_epsilon=args.epsilon,
        opt_projection_format_epsilon=args.format_epsilon,
        opt_weighted_loss_type=args.loss,
        opt_loss_decay_factor=args.decay,
    )
    from cpt import distributed

    if not distributed.is_main():  # under torchrun every rank holds the same adapter: rank 0 writes
        return 0
    cpt_model.save_pretrained(args.output, format=args.format)
    print(json.dumps({
        "adapter": str(args.output),
        "format": args.format,
        "context_examples": len(context),
        "training_examples": len(training),
        "steps": result.steps,
        "resumed_from": None if resume_from is None else str(resume_from),
        "final_loss": result.losses[-1] if result.losses else None,
        "seconds": round(result.wall_time, 1),
    }))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from cpt.labelled_data import split_examples
    from cpt.metrics import macro_f1
    from cpt.workflow import template_of

    data = _load_data(args.data, args.label_names)
    cpt_model, tokenizer = _load_adapter(args)
    labels = (cpt_model.task or {}).get("labels") or data.labels  # a PEFT-layout adapter has none
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
        progress = not args.no_progress and distributed.is_main()
        predictions = _classify(
            cpt_model, tokenizer, mine, labels, template, args.batch_size, progress, args.calibrate
        ).predictions
    predictions = distributed.gather(predictions)
    if not distributed.is_main():
        return 0
    gold = [e.label for e in test]
    print(json.dumps({
        "accuracy": _accuracy(predictions, gold),
        "macro_f1": macro_f1(predictions, gold, labels),
        "calibrated": args.calibrate,
        "examples": len(test),
        "seconds": round(time.perf_counter() - started, 1),
    }))
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from cpt.workflow import template_of

    cpt_model, tokenizer = _load_adapter(args)
    labels = args.labels or (cpt_model.task or {}).get("labels")
    if not labels:
        raise CLIError("the adapter records no label set (PEFT's layout): pass --labels")
    template = template_of(cpt_model)
    _check_fits(cpt_model.base_model, cpt_model.num_virtual_tokens, tokenizer, template, args.texts, labels)
    result = _classify(
        cpt_model, tokenizer, args.texts, labels, template, args.batch_size, not args.no_progress, args.calibrate
    )
    for text, label, probabilities in zip(args.texts, result.predictions, result.probabilities.tolist()):
        print(json.dumps({"text": text, "label": label, "probabilities": dict(zip(labels, probabilities))}))
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from cpt.infer import TEMPERATURE_RANGE, NonFiniteScoresError

    low, high = TEMPERATURE_RANGE
    if not (args.temperature == 0 or low <= args.temperature <= high):  # NaN fails this too
        raise CLIError(f"--temperature must be 0 (greedy) or a number in [{low!r}, {high!r}], got {args.temperature}")
    cpt_model, tokenizer = _load_adapter(args)
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        options["temperature"] = args.temperature
        torch.manual_seed(args.seed)
    texts = tqdm(args.texts, desc="generating", unit="text", file=sys.stderr, disable=args.no_progress)
    for i, text in enumerate(texts):
        try:
            (generated,) = cpt_model.generate(tokenizer, [text], **options)
        except NonFiniteScoresError as error:  # named as the only text of its call: name it by the user's
            raise error.at(i) from None
        tqdm.write(json.dumps({"text": text, "generated": generated}), file=sys.stdout)
    return 0


# ---------------------------------------------------------------------- helpers


def _load_data(name: str, label_names: list[str] | None):  # type: ignore[no-untyped-def]
    """`cpt.labelled_data.load_dataset`, with integer labels replaced by ``label_names`` if given."""
    from cpt.data import Example
    from cpt.labelled_data import LabelledData, load_dataset

    data = load_dataset(name)
    if label_names is None:
        return data
    examples = []
    for i, example in enumerate(data.examples):
        index = example.label
        if not (index.isascii() and index.isdecimal() and int(index) < len(label_names)):
            raise CLIError(
                f"{data.where(i)}: label {index!r} is not an index 0..{len(label_names) - 1} "
                f"of --label-names {label_names}"
            )
        examples.append(Example(example.text, label_names[int(index)]))
    return LabelledData(data.name, examples, list(label_names), data.lines)


def _preflight(args: argparse.Namespace) -> None:
    """What `demo` and `train` check before any data, model or training: the output and checkpoint
    folders, the device and the learning rate (`cpt.train.SMALLEST_NORMAL` to `MAX_LEARNING_RATE`).

    Raises:
        CLIError: naming the option and the value.
    """
    from cpt.train import MAX_LEARNING_RATE, SMALLEST_NORMAL

    _check_output("--output", args.output)
    if getattr(args, "checkpoint_dir", None) is not None:
        from cpt.checkpoint import LAST_CHECKPOINT_NAME

        _check_output("--checkpoint-dir", args.checkpoint_dir / LAST_CHECKPOINT_NAME)
    _device(args.device)
    if not SMALLEST_NORMAL <= args.lr <= MAX_LEARNING_RATE:  # NaN fails this too
        raise CLIError(
            f"--lr must be a number in [{SMALLEST_NORMAL!r}, {MAX_LEARNING_RATE!r}] (AdamW's float32 range), got {args.lr}"
        )


def _device(name: str | None) -> str:
    """The device to run on: ``name``, checked, or cuda when there is one, else cpu.

    Raises:
        CLIError: for a name torch does not know, the meta device (it holds no weights), or a
            device this machine does not have.
    """
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a device name such as cpu, cuda or cuda:1") from None
    if device.type == "cpu":
        return name
    if device.type == "meta":
        raise CLIError(f"--device {name!r} holds no weights and cannot run a model; use cpu or cuda")
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", lambda: False)
    if backend is None or not available():
        raise CLIError(f"--device {name!r}: this machine has no {device.type} device (use cpu)")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise CLIError(f"--device {name!r}: there are {count} {device.type} device(s), numbered from 0")
    return name


def _check_output(option: str, path: Path) -> None:
    """Refuses, before any training, an output folder that cannot be written (`cpt._io.check_target`).

    Raises:
        CLIError: naming the option, the path and the problem.
    """
    from cpt import _io

    try:
        _io.check_target(path)
    except ValueError as error:
        raise CLIError(f"{option}: {error}") from None


def _output_path(text: str) -> Path:
    """An ``--output`` or ``--checkpoint-dir`` value; empty text names no folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names no folder")
    return Path(text)


def _load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from cpt import distributed
    from cpt.pretrained import load_model_and_tokenizer

    device = _device(args.device)
    if distributed.launched():  # torchrun or accelerate launch: join the group, one device per rank
        device = str(distributed.init_from_env(device))
    model, tokenizer = load_model_and_tokenizer(args.model, device=device, dtype=args.dtype)
    return model, tokenizer, device


def _load_adapter(args: argparse.Namespace) -> tuple[Any, Any]:
    from cpt.adapter import adapter_format
    from cpt.hub import resolve_adapter
    from cpt.model import CPTModel

    folder = resolve_adapter(args.adapter)
    adapter_format(folder)  # a missing or foreign folder is reported before the model loads
    model, tokenizer, _ = _load_model(args)
    return CPTModel.from_pretrained(model, folder), tokenizer


def _classify(
    cpt_model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[str], template: Any,
    batch_size: int, progress: bool, calibrate: bool = False,
):  # type: ignore[no-untyped-def]
    """`cpt.infer.classify` of ``texts``, with its progress bar on stderr where asked."""
    from cpt.infer import classify

    return classify(
        cpt_model, tokenizer, texts, labels, template=template, batch_size=batch_size, calibrate=calibrate,
        progress=progress,
    )


def _train_config(args: argparse.Namespace, checkpoint_every: int | None = None):  # type: ignore[no-untyped-def]
    from cpt.train import TrainConfig

    return TrainConfig(
        learning_rate=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint_every=checkpoint_every,
        progress=not args.no_progress,
        shard_base_model=getattr(args, "shard_base_model", False),  # `cpt train` only
    )


def _selection(args: argparse.Namespace) -> str | None:
    return None if args.selection == NO_SELECTION else args.selection


def _check_fits(
    model: Any, context_tokens: int, tokenizer: Any, template: Any, texts: Sequence[str], labels: Sequence[str]
) -> None:
    """Refuses a context of ``context_tokens`` plus the longest example that ``model`` (the base
    model) cannot take in."""
    from cpt._compat import check_positions
    from cpt.data import render_example

    for name, values in (("text", texts), ("label", labels)):
        for i, value in enumerate(values):  # argv's bytes that are not UTF-8 arrive as lone surrogates
            check_text(value, f"{name} {i + 1}")
    longest_label = max(labels, key=lambda label: len(tokenizer.encode(label, add_special_tokens=False)))
    longest = max((len(render_example(tokenizer, template, text, longest_label)) for text in texts), default=0)
    try:
        check_positions(model.config, context_tokens, longest, "the longest example")
    except ValueError as error:
        raise CLIError(str(error)) from None


def _accuracy(predictions: Sequence[str], gold: Sequence[str]) -> float:
    return sum(p == g for p, g in zip(predictions, gold)) / max(len(gold), 1)


if __name__ == "__main__":
    sys.exit(main())
