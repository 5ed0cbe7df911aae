"""The training problems of the multi-process tests, shared by the ranks
(tests/distributed_worker.py) and the single-process references (tests/test_distributed.py).

Labels have one or two tokens, so the ranks' shares of a batch hold unequal numbers of loss
terms; 7 samples in batches of 3 leave a last batch of one sample, whose second rank's share
is empty.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import make_model
from tokenizers_util import make_wordlevel_tokenizer

from cpt import distributed
from cpt.data import CPTCollator, CPTDataset, Example, build_context
from cpt.model import CPTModel
from cpt.train import LAST_CHECKPOINT_NAME, TrainConfig, train

CONTEXT = [
    Example("the movie was great", "very positive"),
    Example("an awful film", "negative"),
    Example("a fine story", "positive"),
    Example("boring and too long", "very negative"),
]
TRAINING = CONTEXT + [
    Example("a great film", "positive"),
    Example("too long and awful", "very negative"),
    Example("the story was fine", "very positive"),
]

TRAINER_SAMPLES = TRAINING[3:]
"""What `Trainer` trains on: labels of 2, 1, 2 and 2 tokens, so however 2 ranks split these 4
samples, their label counts differ (7 is odd)."""

TOTAL_STEPS = 4
HALF_STEPS = 2


def tokenizer():  # type: ignore[no-untyped-def]
    return make_wordlevel_tokenizer()


def fresh_model(arch: str = "llama") -> CPTModel:
    context = build_context(tokenizer(), CONTEXT, opt_projection_epsilon=0.1, opt_projection_format_epsilon=0.05)
    return CPTModel(make_model(arch, seed=0), context, compile_projection="off")


def train_config(max_steps: int = TOTAL_STEPS, **overrides) -> TrainConfig:  # type: ignore[no-untyped-def]
    values = dict(
        learning_rate=1e-2, batch_size=3, gradient_accumulation_steps=2, max_steps=max_steps, progress=False
    )
    values.update(overrides)
    return TrainConfig(**values)


def run_train(
    max_steps: int = TOTAL_STEPS,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    shard: bool = False,
) -> tuple[CPTModel, list[float]]:
    """cpt.train on `TRAINING`; with several processes each rank takes its share of a batch."""
    tok = tokenizer()
    model = fresh_model()
    if shard:
        distributed.shard_base_model(model)
    result = train(
        model,
        CPTDataset(tok, TRAINING),
        train_config(max_steps, checkpoint_every=1 if checkpoint_dir else None),
        collator=CPTCollator(tok.pad_token_id),
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
    )
    return model, result.losses


def run_trainer(
    output_dir: Path, batch_size: int, accumulation: int = 1, max_steps: int = 3, arch: str = "gpt2", **args
) -> tuple[CPTModel, list[float]]:
    """CPTTrainer on `TRAINER_SAMPLES` (4 samples: every step sees all of them, in any order)."""
    from transformers import TrainingArguments

    from cpt.callback import CPTTrainer, TrainerCollator

    tok = tokenizer()
    model = fresh_model(arch)
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=max_steps,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **{"save_strategy": "no", **args},
    )
    trainer = CPTTrainer(
        model=model,
        args=arguments,
        train_dataset=CPTDataset(tok, TRAINER_SAMPLES),
        data_collator=TrainerCollator(model, tok.pad_token_id),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model, losses


REVIEWS = {
    "positive": ["the movie was great", "a fine story", "the actors were good"],
    "negative": ["an awful film", "boring and too long", "the plot was thin"],
}


def prepare_cli(root: Path) -> None:
    """A tiny model folder and a data file for the command-line scenarios."""
    import json

    from tiny_models import make_model
    from tokenizers_util import make_bpe_tokenizer

    bpe = make_bpe_tokenizer()
    make_model("llama", vocab_size=len(bpe)).save_pretrained(root / "cli_model")
    bpe.save_pretrained(root / "cli_model")
    (root / "cli_data.jsonl").write_text("".join(
        json.dumps({"text": f"{text} {i}", "label": label}) + "\n"
        for label, texts in REVIEWS.items() for text in texts for i in range(4)
    ))


def cli_train_args(root: Path, output: Path) -> list[str]:
    """`cpt train`: 2 context examples + 5 more, batches of 3 (7 = 3 + 3 + 1), 2 epochs."""
    return ["train", "--model", str(root / "cli_model"), "--data", str(root / "cli_data.jsonl"), "--device", "cpu",
            "--per-class", "1", "--train", "5", "--test", "5", "--epochs", "2", "--batch-size", "3",
            "--lr", "1e-2", "--no-progress", "--output", str(output)]


def cli_eval_args(root: Path, adapter: Path) -> list[str]:
    """`cpt eval` of 7 texts in batches of 2."""
    return ["eval", "--model", str(root / "cli_model"), "--data", str(root / "cli_data.jsonl"), "--device", "cpu",
            "--adapter", str(adapter), "--test", "7", "--batch-size", "2"]


def _cli_train(root: Path):  # type: ignore[no-untyped-def]
    from cpt.cli import main

    assert main(cli_train_args(root, root / "cli_two")) == 0
    return None, []


def _cli_eval(root: Path):  # type: ignore[no-untyped-def]
    import contextlib
    import io

    from cpt.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(cli_eval_args(root, root / "cli_one")) == 0
    assert torch.distributed.is_initialized()  # the caller's group: the command leaves it to the caller
    (root / "cli_eval").mkdir(exist_ok=True)
    (root / "cli_eval" / f"stdout.{distributed.rank()}.txt").write_text(printed.getvalue())
    return None, []


def _disagree(root: Path):  # type: ignore[no-untyped-def]
    """Rank 1 asks for another learning rate: every rank must refuse before the first step."""
    tok = tokenizer()
    config = train_config(learning_rate=1e-2 * (1 + distributed.rank()))
    try:
        train(fresh_model(), CPTDataset(tok, TRAINING), config, collator=CPTCollator(tok.pad_token_id))
    except ValueError as error:
        (root / "disagree").mkdir(exist_ok=True)
        (root / "disagree" / f"error.{distributed.rank()}.txt").write_text(str(error))
    return None, []


def _ddp(root: Path):  # type: ignore[no-untyped-def]
    return run_train(checkpoint_dir=root / "ddp_checkpoints")


def _ddp_half(root: Path):  # type: ignore[no-untyped-def]
    return run_train(HALF_STEPS, checkpoint_dir=root / "ddp_half")


def _ddp_resume(root: Path):  # type: ignore[no-untyped-def]
    return run_train(resume_from=root / "single_half" / LAST_CHECKPOINT_NAME)


def _fsdp(root: Path):  # type: ignore[no-untyped-def]
    return run_train(shard=True)


def _trainer_ddp(root: Path):  # type: ignore[no-untyped-def]
    return run_trainer(root / "trainer_ddp_out", batch_size=2)


SCENARIOS = {
    "ddp": _ddp,
    "ddp_half": _ddp_half,
    "ddp_resume": _ddp_resume,
    "fsdp": _fsdp,
    "trainer_ddp": _trainer_ddp,
    "cli_train": _cli_train,
    "cli_eval": _cli_eval,
    "disagree": _disagree,
}
"""What each rank runs, by name (tests/distributed_worker.py)."""
