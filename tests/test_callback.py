"""Tests of cpt/callback.py: `transformers.Trainer` with a CPTModel, on one process.

Gradient accumulation gives the loss and gradient of the whole batch; checkpoints of a model with
tied embeddings (GPT-2) hold the adapter, load with `CPTModel.from_pretrained` and resume; the
callback reports a model that is not a CPTModel. Multi-process runs are in test_distributed.py.
"""

from __future__ import annotations

import json

import distributed_cases as cases
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_model
from transformers import Trainer, TrainingArguments

from cpt.adapter import CPT_CONFIG_NAME, PEFT_CONFIG_NAME
from cpt.callback import CPTProjectionCallback, CPTTrainer, TrainerCollator
from cpt.data import CPTCollator, CPTDataset
from cpt.model import CPTModel

TOLERANCE = 1e-6


def full_batch(model: CPTModel) -> dict[str, torch.Tensor]:
    tokenizer = cases.tokenizer()
    dataset = CPTDataset(tokenizer, cases.TRAINER_SAMPLES)
    return CPTCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def exact_first_step(arch: str = "gpt2") -> tuple[float, float]:
    """The loss and gradient norm of the whole batch at the start: what step 1 must log."""
    model = cases.fresh_model(arch)
    loss = model(**full_batch(model)).loss
    loss.backward()
    return float(loss.detach()), float(torch.linalg.vector_norm(model.delta.grad))


def first_logged(trainer_losses: list[float], output_dir) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    state = json.loads((output_dir / "checkpoint-1" / "trainer_state.json").read_text())
    entry = next(e for e in state["log_history"] if "loss" in e)
    return entry["loss"], entry["grad_norm"]


# ---------------------------------------------------------------------- the loss's normalisation


@pytest.mark.parametrize("batch_size, accumulation", [(4, 1), (2, 2), (1, 4)])
def test_accumulation_gives_the_whole_batch_loss_and_gradient(tmp_path, batch_size, accumulation) -> None:
    model, losses = cases.run_trainer(
        tmp_path, batch_size=batch_size, accumulation=accumulation, max_steps=1,
        save_strategy="steps", save_steps=1,
    )
    loss, grad_norm = first_logged(losses, tmp_path)
    expected_loss, expected_norm = exact_first_step()
    print(f"\nTrainer {batch_size} x {accumulation}: |loss - exact| = {abs(loss - expected_loss):.3g}, "
          f"|grad norm - exact| = {abs(grad_norm - expected_norm):.3g}")
    assert abs(loss - expected_loss) <= TOLERANCE
    assert abs(grad_norm - expected_norm) <= TOLERANCE * expected_norm


def test_accumulated_training_matches_one_batch(tmp_path) -> None:
    whole, whole_losses = cases.run_trainer(tmp_path / "whole", batch_size=4)
    split, split_losses = cases.run_trainer(tmp_path / "split", batch_size=2, accumulation=2)
    difference = float((whole.delta - split.delta).detach().abs().max())
    print(f"\nTrainer accumulation 2 x 2 vs 4: max |delta difference| = {difference:.3g}")
    assert float(whole.delta.abs().max()) > 1e-3
    assert difference <= TOLERANCE
    assert max(abs(a - b) for a, b in zip(whole_losses, split_losses)) <= 1e-5


def test_forward_divides_by_num_items_in_batch() -> None:
    model = cases.fresh_model()
    batch = full_batch(model)
    plain = model(**batch)
    for sharing in ("on", "off"):
        model.context_sharing = sharing
        output = model(**batch, num_items_in_batch=3 * plain.num_targets)
        torch.testing.assert_close(output.loss * 3, plain.loss, rtol=1e-6, atol=0)
        tensor = model(**batch, num_items_in_batch=torch.tensor(3.0 * plain.num_targets))
        torch.testing.assert_close(tensor.loss, output.loss, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        model(**batch, num_items_in_batch=0)


def test_loss_targets_count_the_loss_terms() -> None:
    model = cases.fresh_model()
    batch = full_batch(model)
    targets = model.loss_targets(batch["labels"], batch["input_type_mask"])
    assert targets.shape[0] == batch["input_ids"].shape[0]
    assert int((targets != -100).sum()) == model(**batch).num_targets
    # the context's labels come first, once per row
    assert torch.equal(targets[0, : model.context.target_ids.numel()], model.context.target_ids)


def test_shift_labels_of_another_context_are_refused() -> None:
    model = cases.fresh_model()
    batch = TrainerCollator(model, cases.tokenizer().pad_token_id)(
        [CPTDataset(cases.tokenizer(), cases.CONTEXT)[0]]
    )
    model(**batch)  # its own count: fine
    batch["shift_labels"] = batch["shift_labels"][:, 1:]
    with pytest.raises(ValueError, match="TrainerCollator"):
        model(**batch)


# ---------------------------------------------------------------------- saving and resuming


def test_state_dict_is_the_adapter_alone() -> None:
    model = cases.fresh_model("gpt2")  # tied input and output embeddings
    state = model.state_dict()
    assert sorted(state) == ["base", "delta"]
    other = cases.fresh_model("gpt2")
    with torch.no_grad():
        model.delta.add_(0.01)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.delta, model.delta)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        other.load_state_dict({**model.state_dict(), "extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="shape"):
        other.load_state_dict({"base": model.base, "delta": model.delta[1:]})


@pytest.mark.parametrize("adapter_format", ["cpt", "peft"])
def test_tied_checkpoints_hold_the_adapter_load_and_resume(tmp_path, adapter_format) -> None:
    args = dict(save_strategy="steps", save_steps=2)
    tokenizer = cases.tokenizer()
    model = cases.fresh_model("gpt2")
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, **args,
    )

    def trainer(cpt_model: CPTModel) -> CPTTrainer:
        return CPTTrainer(
            model=cpt_model, args=arguments, train_dataset=CPTDataset(tokenizer, cases.CONTEXT),
            data_collator=TrainerCollator(cpt_model, tokenizer.pad_token_id), adapter_format=adapter_format,
        )

    trainer(model).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    config_name = CPT_CONFIG_NAME if adapter_format == "cpt" else PEFT_CONFIG_NAME
    assert (checkpoint / config_name).is_file()
    assert sorted(load_file(checkpoint / "model.safetensors")) == ["base", "delta"]  # no base model

    loaded = CPTModel.from_pretrained(make_model("gpt2"), checkpoint)
    assert float(loaded.delta.abs().max() + (loaded.base - model.base).abs().max()) > 0

    resumed = cases.fresh_model("gpt2")
    trainer(resumed).train(resume_from_checkpoint=str(checkpoint))
    difference = float((resumed.delta - model.delta).abs().max())
    print(f"\nTrainer resume from checkpoint-2 ({adapter_format}): max |delta difference| = {difference:.3g}")
    assert difference == 0.0

    final = trainer(model)
    final.save_model(str(tmp_path / "final"))
    reloaded = CPTModel.from_pretrained(make_model("gpt2"), tmp_path / "final")
    torch.testing.assert_close(reloaded.context_embeddings(), model.context_embeddings(), rtol=0, atol=1e-6)


def test_plain_trainer_with_the_callback_checkpoints_a_tied_model(tmp_path) -> None:
    tokenizer = cases.tokenizer()
    model = cases.fresh_model("gpt2")
    arguments = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="steps", save_steps=1, disable_tqdm=True,
    )
    Trainer(
        model=model, args=arguments, train_dataset=CPTDataset(tokenizer, cases.CONTEXT),
        data_collator=TrainerCollator(model, tokenizer.pad_token_id), callbacks=[CPTProjectionCallback()],
    ).train()
    loaded = CPTModel.from_pretrained(make_model("gpt2"), tmp_path / "checkpoint-2")
    assert torch.equal(loaded.delta, model.delta)
    assert model.is_projected()


def test_callback_reports_a_model_that_is_not_cpt(tmp_path) -> None:
    tokenizer = cases.tokenizer()
    base = make_model("gpt2")
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    dataset = CPTDataset(tokenizer, cases.CONTEXT)
    trainer = Trainer(
        model=base, args=arguments, train_dataset=dataset, data_collator=CPTCollator(tokenizer.pad_token_id),
        callbacks=[CPTProjectionCallback()],
    )
    with pytest.raises(ValueError, match="CPTProjectionCallback needs a CPTModel"):
        trainer.train()
    with pytest.raises(ValueError, match="adapter_format"):
        CPTProjectionCallback("safetensors")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        TrainerCollator(cases.fresh_model())
