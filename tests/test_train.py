"""Tests of cpt/train.py: the projected AdamW loop, checkpoints and resume, the Trainer callback.

Everything runs on the CPU with tiny random models and an offline word-level tokenizer. The
training samples are the context's own examples: the paper's few-shot setting.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import make_model
from tokenizers_util import make_wordlevel_tokenizer

from cpt import distributed
from cpt.callback import CPTProjectionCallback
from cpt.checkpoint import ADAPTER_DIR, LAST_CHECKPOINT_NAME, STATE_JSON_NAME, STATE_TENSORS_NAME
from cpt.config import CPTConfig, is_trainable
from cpt.data import CPTCollator, CPTDataset, Example, build_context
from cpt.model import CPTModel
from cpt.train import (
    MicroBatchPass,
    TrainConfig,
    TrainResult,
    TrainState,
    epoch_order,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    train,
)

EXAMPLES = [
    Example("the movie was great", "very positive"),  # a two-token label: label counts differ
    Example("an awful film", "negative"),
    Example("a fine story", "positive"),
    Example("boring and too long", "very negative"),
]

BALL_TOLERANCE = 1e-6
"""Slack on ``||delta_i|| <= eps_i``: the projection scales by ``eps / ||delta||`` in float32, so a
projected row's norm can exceed eps by a few ulps (eps ~ 1e-2, ulp ~ 1e-9)."""


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return make_wordlevel_tokenizer()


@pytest.fixture(scope="module")
def context(tokenizer) -> CPTConfig:
    return build_context(
        tokenizer, EXAMPLES, opt_projection_epsilon=0.1, opt_projection_format_epsilon=0.05
    )


@pytest.fixture(scope="module")
def dataset(tokenizer) -> CPTDataset:
    return CPTDataset(tokenizer, EXAMPLES)


@pytest.fixture(scope="module")
def collator(tokenizer) -> CPTCollator:
    return CPTCollator(tokenizer.pad_token_id)


def fresh_model(config: CPTConfig, arch: str = "llama", seed: int = 0) -> CPTModel:
    return CPTModel(make_model(arch, seed=seed), config, compile_projection="off")


def quick_config(**overrides) -> TrainConfig:
    values = dict(learning_rate=1e-2, epochs=2, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def mean_dataset_loss(model: CPTModel, dataset: CPTDataset, collator: CPTCollator) -> float:
    with torch.no_grad():
        return model(**collator([dataset[i] for i in range(len(dataset))])).loss.item()


def assert_invariants(model: CPTModel, base_model_state: dict[str, torch.Tensor]) -> None:
    """Frozen parts unchanged bit for bit, every row in its ball, label/separator rows zero."""
    embeddings = model.base_model.get_input_embeddings()
    expected_base = embeddings(model.context.ids).detach().float()
    assert torch.equal(model.base, expected_base)
    for name, tensor in model.base_model.state_dict().items():
        assert torch.equal(tensor, base_model_state[name]), name
    norms = torch.linalg.vector_norm(model.delta.detach(), dim=1)  # (N,)
    assert bool((norms <= model.epsilon + BALL_TOLERANCE).all()), (norms - model.epsilon).max()
    frozen = ~is_trainable(model.context.codes)
    assert bool(frozen.any())
    assert bool((model.delta.detach()[frozen] == 0).all())
    assert model.delta.dtype == torch.float32


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------- training


def test_loss_goes_down_and_eval_history_is_kept(tokenizer, dataset, collator, caplog) -> None:
    # Wide balls so the context can move enough for a tiny random model's loss to drop clearly.
    config = build_context(
        tokenizer, EXAMPLES, opt_projection_epsilon=20.0, opt_projection_format_epsilon=20.0
    )
    model = fresh_model(config)
    before = mean_dataset_loss(model, dataset, collator)
    with caplog.at_level("INFO", logger="cpt.train"):
        result = train(
            model,
            dataset,
            quick_config(learning_rate=5e-2, epochs=3, eval_every=4, log_every=6, progress=True),
            collator=collator,
            eval_fn=lambda m: {"loss": mean_dataset_loss(m, dataset, collator)},
        )
    after = mean_dataset_loss(model, dataset, collator)
    assert isinstance(result, TrainResult)
    assert result.steps == 12 and len(result.losses) == 12
    assert result.epoch == pytest.approx(3.0)
    assert after < 0.92 * before, (before, after)  # measured: 4.71 -> 4.13
    assert [e["step"] for e in result.eval_history] == [4, 8, 12]
    assert result.eval_history[-1]["loss"] == pytest.approx(after, rel=1e-6)
    assert result.eval_history[0]["loss"] < before
    assert result.wall_time > 0
    logged = [r.getMessage() for r in caplog.records if r.name == "cpt.train"]
    assert [m.split(":")[0] for m in logged] == ["step 6", "step 12"]
    assert not model.base_model.training  # frozen base: eval mode, no dropout


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_invariants_after_training(context, dataset, collator, arch: str, monkeypatch) -> None:
    model = fresh_model(context, arch)
    frozen_state = snapshot(model.base_model)
    calls = []
    project = model.project_
    monkeypatch.setattr(model, "project_", lambda: (calls.append(1), project())[1])
    result = train(model, dataset, quick_config(), collator=collator)
    assert len(calls) == result.steps == 8  # one projection per optimizer step
    assert_invariants(model, frozen_state)
    # The test can fail: lr 1e-2 moves a row by ~1e-2 * sqrt(d) per step, beyond its radius.
    norms = torch.linalg.vector_norm(model.delta.detach(), dim=1)
    on_boundary = is_trainable(model.context.codes)
    assert torch.allclose(norms[on_boundary], model.epsilon[on_boundary], rtol=1e-5, atol=0)


def test_gradient_accumulation_equals_the_big_batch(context, dataset, collator) -> None:
    # Same seed, so step k sees samples order[2k], order[2k+1] either way. Batch 2 takes the
    # shared-context path and pads the shorter sample; two single samples take the plain path:
    # the same function summed in another order, so float32 rounding differs. Measured on this
    # setup: losses within 2e-7 relative, delta within ~1e-8 absolute (delta itself ~2e-3).
    # Tolerances are 10x (loss) and 100x (delta) that: Adam divides each coordinate by its own
    # running scale, which can amplify rounding on near-zero gradient coordinates. The samples'
    # label counts differ (1 vs 2 tokens): a mean of per-micro-batch means instead of the
    # label-weighted mean is off by 2.2e-5 relative in the loss here, 10x over the tolerance.
    big = fresh_model(context)
    accumulated = fresh_model(context)
    single = fresh_model(context)
    r_big = train(big, dataset, quick_config(batch_size=2), collator=collator)
    accumulation = quick_config(batch_size=1, gradient_accumulation_steps=2)
    r_acc = train(accumulated, dataset, accumulation, collator=collator)
    train(single, dataset, quick_config(batch_size=1, max_steps=4), collator=collator)
    assert r_big.steps == r_acc.steps == 4
    torch.testing.assert_close(torch.tensor(r_acc.losses), torch.tensor(r_big.losses), rtol=2e-6, atol=0)
    torch.testing.assert_close(accumulated.delta, big.delta, rtol=0, atol=1e-6)
    assert (single.delta - big.delta).abs().max() > 1e-3  # control: no accumulation is different
    # control: the mean of the first window's two per-sample means misses the tolerance
    first_window = [dataset[i] for i in epoch_order(len(dataset), 0, 0)[:2]]
    with torch.no_grad():
        means = [fresh_model(context)(**collator([item])).loss.item() for item in first_window]
    assert abs(sum(means) / 2 - r_big.losses[0]) > 5 * 2e-6 * r_big.losses[0]


def test_one_step_function_counts_first_and_serves_the_data_parallel_share(context, dataset, collator) -> None:
    """`MicroBatchPass` gives a micro-batch's loss-term count before its backward pass runs, and
    its backward adds ``scale`` times the gradient; `cpt.distributed.backward_share` (one process
    here) drives it over a window to the whole batch's loss and gradient."""
    items = [dataset[i] for i in range(4)]
    whole = fresh_model(context)
    reference = whole(**collator(items)).loss
    reference.backward()

    model = fresh_model(context)
    passes = MicroBatchPass(model, None, nullcontext)
    count, backward = passes(collator(items[:1]))
    assert model.delta.grad is None  # counted, not yet run backward
    assert count == model(**collator(items[:1])).num_targets
    single = backward(2.0)
    once = model.delta.grad.clone()
    model.delta.grad = None
    model(**collator(items[:1])).loss.backward()
    torch.testing.assert_close(once, 2 * model.delta.grad, rtol=1e-6, atol=0)
    assert single == model(**collator(items[:1])).loss.detach()

    model.delta.grad = None
    loss = distributed.backward_share(model, [[0, 1], [2, 3]], lambda ids: collator([items[i] for i in ids]), passes)
    assert math.isclose(loss, reference.item(), rel_tol=1e-6)
    difference = (model.delta.grad - whole.delta.grad).norm() / whole.delta.grad.norm()
    assert difference <= 1e-5  # the shared path of 2 + 2 samples against that of 4: rounding apart


def test_seeds_reproduce_and_differ(context, dataset, collator) -> None:
    runs = []
    for seed in (3, 3, 4):
        model = fresh_model(context)
        config = quick_config(seed=seed, batch_size=1, max_steps=3)
        result = train(model, dataset, config, collator=collator)
        runs.append((model.delta.detach().clone(), result.losses))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert not torch.equal(runs[0][0], runs[2][0])
    assert sorted(epoch_order(10, 3, 0)) == list(range(10))
    assert epoch_order(10, 3, 0) == epoch_order(10, 3, 0)
    assert epoch_order(10, 3, 0) != epoch_order(10, 3, 1)
    assert epoch_order(10, 3, 0) != epoch_order(10, 4, 0)


def test_max_steps_overrides_epochs_and_partial_windows(context, dataset, collator) -> None:
    # 4 samples, batch 3: batches of 3 and 1; accumulation 2 makes one step per epoch.
    result = train(
        fresh_model(context),
        dataset,
        quick_config(batch_size=3, gradient_accumulation_steps=2, epochs=1, max_steps=5),
        collator=collator,
    )
    assert result.steps == 5 and result.epoch == pytest.approx(5.0)


def test_bf16_autocast_keeps_the_adapter_float32(context, dataset, collator) -> None:
    model = fresh_model(context)
    frozen_state = snapshot(model.base_model)
    result = train(model, dataset, quick_config(mixed_precision="bf16", max_steps=2), collator=collator)
    assert all(math.isfinite(x) for x in result.losses)
    assert_invariants(model, frozen_state)


# ---------------------------------------------------------------------- checkpoints


def noisy_eval(model: CPTModel) -> dict[str, float]:
    """Uses the global RNGs, so only a resume that restores them reproduces its history."""
    return {"delta_sum": model.delta.sum().item(), "noise": torch.rand(()).item()}


def test_resume_is_bit_for_bit(context, dataset, collator, tmp_path: Path) -> None:
    # 4 samples per epoch: 6 steps cross an epoch boundary, the break at step 3 is mid-epoch.
    config = quick_config(max_steps=6, eval_every=2)
    straight = fresh_model(context)
    expected = train(straight, dataset, config, collator=collator, eval_fn=noisy_eval)

    first = fresh_model(context)
    train(first, dataset, quick_config(max_steps=3, eval_every=2), collator=collator, eval_fn=noisy_eval,
          checkpoint_dir=tmp_path)
    folder = tmp_path / LAST_CHECKPOINT_NAME
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == [
        f"{ADAPTER_DIR}/cpt_adapter.safetensors",
        f"{ADAPTER_DIR}/cpt_config.json",
        STATE_JSON_NAME,
        STATE_TENSORS_NAME,
    ]  # no pickle anywhere
    state = json.loads((folder / STATE_JSON_NAME).read_text())
    assert (state["step"], state["epoch"], state["position"]) == (3, 0, 3)

    torch.rand(100)  # disturb the global RNG: the resume must restore it
    resumed = fresh_model(context)  # a new model and optimizer
    result = train(resumed, dataset, config, collator=collator, eval_fn=noisy_eval, resume_from=folder)
    assert torch.equal(resumed.delta, straight.delta)
    assert result.losses == expected.losses
    assert result.eval_history == expected.eval_history
    assert result.steps == 6


def test_resume_with_accumulation_and_periodic_checkpoints(
    context, dataset, collator, tmp_path: Path
) -> None:
    config = quick_config(batch_size=1, gradient_accumulation_steps=2, max_steps=5, checkpoint_every=2)
    straight = fresh_model(context)
    expected = train(straight, dataset, config, collator=collator, checkpoint_dir=tmp_path / "a")

    interrupted = quick_config(
        batch_size=1, gradient_accumulation_steps=2, max_steps=3, checkpoint_every=2
    )
    train(fresh_model(context), dataset, interrupted, collator=collator, checkpoint_dir=tmp_path / "b")
    folder = tmp_path / "b" / LAST_CHECKPOINT_NAME
    assert json.loads((folder / STATE_JSON_NAME).read_text())["step"] == 3  # the final save
    resumed = fresh_model(context)
    result = train(
        resumed, dataset, config, collator=collator, resume_from=folder, checkpoint_dir=tmp_path / "c"
    )
    assert torch.equal(resumed.delta, straight.delta)
    assert result.losses == expected.losses
    for name in ("a", "c"):  # the final checkpoints agree too
        a = (tmp_path / name / LAST_CHECKPOINT_NAME / STATE_TENSORS_NAME).read_bytes()
        assert a == (tmp_path / "a" / LAST_CHECKPOINT_NAME / STATE_TENSORS_NAME).read_bytes()
    # no temp folder left behind by the periodic saves
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [LAST_CHECKPOINT_NAME]


def test_resume_rejects_a_mismatched_checkpoint(
    tokenizer, context, dataset, collator, tmp_path: Path
) -> None:
    config = quick_config(max_steps=2)
    train(fresh_model(context), dataset, config, collator=collator, checkpoint_dir=tmp_path)
    folder = tmp_path / LAST_CHECKPOINT_NAME

    other_context = build_context(tokenizer, EXAMPLES[:3])
    with pytest.raises(ValueError, match="does not match the model"):
        train(fresh_model(other_context), dataset, config, collator=collator, resume_from=folder)
    with pytest.raises(ValueError, match="base embeddings differ"):
        train(fresh_model(context, seed=1), dataset, config, collator=collator, resume_from=folder)
    with pytest.raises(ValueError, match="batch_size"):
        train(fresh_model(context), dataset, quick_config(max_steps=2, batch_size=2), collator=collator,
              resume_from=folder)
    with pytest.raises(ValueError, match="samples"):
        train(fresh_model(context), CPTDataset(tokenizer, EXAMPLES[:3]), config, collator=collator,
              resume_from=folder)
    with pytest.raises(ValueError, match="no checkpoint folder at"):
        train(fresh_model(context), dataset, config, collator=collator, resume_from=tmp_path / "missing")


# ---------------------------------------------------------------------- config and arguments


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("learning_rate", "1e-4"),
        ("epochs", 0),
        ("epochs", 1.5),
        ("epochs", True),
        ("batch_size", 0),
        ("gradient_accumulation_steps", 0),
        ("weight_decay", -0.1),
        ("max_steps", 0),
        ("seed", -1),
        ("eval_every", 0),
        ("checkpoint_every", 0),
        ("log_every", 0),
        ("progress", "yes"),
        ("mixed_precision", "fp16"),
        ("max_grad_norm", 0.0),
    ],
)
def test_train_config_rejects_bad_values(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_rejects_bad_arguments(context, dataset, collator) -> None:
    model = fresh_model(context)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(model, dataset, quick_config(checkpoint_every=1), collator=collator)
    with pytest.raises(ValueError, match="empty"):
        train(model, [], quick_config(), collator=collator)
    with pytest.raises(ValueError, match="TrainConfig"):
        train(model, dataset, {"epochs": 1}, collator=collator)


def test_learning_rate_bound_is_what_adamw_can_step(context, dataset, collator) -> None:
    from cpt.train import ADAM_BETAS, MAX_LEARNING_RATE, SMALLEST_NORMAL

    at, beyond = MAX_LEARNING_RATE, math.nextafter(MAX_LEARNING_RATE, math.inf)
    for rate in (at, beyond):  # torch's AdamW itself: its first step computes exactly up to the bound
        param = torch.nn.Parameter(torch.zeros(3))
        param.grad = torch.tensor([1.0, -2.0, 0.0])
        optimizer = torch.optim.AdamW([param], lr=rate, betas=ADAM_BETAS)
        if rate == at:
            optimizer.step()
            assert bool(torch.isfinite(param.detach()).all()) and float(param.detach().abs().max()) > 1e37
        else:
            with pytest.raises(RuntimeError, match="overflow"):
                optimizer.step()
    message = f"learning_rate must be a finite number in [{SMALLEST_NORMAL!r}, {at!r}], got {beyond!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TrainConfig(learning_rate=beyond)
    model = fresh_model(context)
    base_model_state = snapshot(model.base_model)
    result = train(model, dataset, quick_config(learning_rate=at, max_steps=2), collator=collator)
    assert result.steps == 2 and all(math.isfinite(loss) for loss in result.losses)
    assert_invariants(model, base_model_state)  # projected back into the balls, finite


@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_numbers_beyond_float_are_refused(value: int) -> None:
    for field in ("learning_rate", "weight_decay", "max_grad_norm"):
        with pytest.raises(ValueError, match=f"^{field} must be a finite number"):
            TrainConfig(**{field: value})


def test_seed_range_is_what_torch_generators_take(context, dataset, collator) -> None:
    from cpt._fields import MAX_SEED
    from cpt.labelled_data import LabelledData, split_examples

    torch.Generator().manual_seed(MAX_SEED)  # the largest seed torch takes...
    with pytest.raises((ValueError, RuntimeError)):
        torch.Generator().manual_seed(MAX_SEED + 1)  # ...and the first it does not
    message = r"^seed must be an integer in \[0, 2\*\*64 - 1\], got "
    data = LabelledData("d", EXAMPLES, sorted({e.label for e in EXAMPLES}))
    for seed in (MAX_SEED + 1, -1, 1.0, True):
        with pytest.raises(ValueError, match=message):
            TrainConfig(seed=seed)
        with pytest.raises(ValueError, match=message):  # the draws take the seeds training takes
            split_examples(data, per_class=0, n_test=1, seed=seed)
    result = train(fresh_model(context), dataset, quick_config(seed=MAX_SEED, max_steps=1), collator=collator)
    assert result.steps == 1


# ---------------------------------------------------------------------- transformers.Trainer


def run_hf_trainer(model: CPTModel, dataset, collator, tmp_path: Path, callbacks: list) -> None:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks
    )
    trainer.train()


def test_projection_callback_with_transformers_trainer(
    context, dataset, collator, tmp_path: Path
) -> None:
    model = fresh_model(context)
    frozen_state = snapshot(model.base_model)
    run_hf_trainer(model, dataset, collator, tmp_path, [CPTProjectionCallback()])
    assert bool((model.delta != 0).any())
    assert_invariants(model, frozen_state)

    control = fresh_model(context)  # the same training without the callback leaves the balls
    run_hf_trainer(control, dataset, collator, tmp_path, [])
    norms = torch.linalg.vector_norm(control.delta.detach(), dim=1)
    assert bool((norms > control.epsilon + BALL_TOLERANCE).any())


def test_projection_callback_needs_a_cpt_model() -> None:
    with pytest.raises(ValueError, match="CPTModel"):
        CPTProjectionCallback().on_step_end(None, None, None, model=torch.nn.Linear(2, 2))
