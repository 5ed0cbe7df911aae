"""Tests of cpt/loss.py: which positions are targets, what they weigh, how many there are and
what the weighted sum is divided by; the plain and shared formulations agree, and every path
(eager plain, eager shared, the CUDA graphs' padded plan) counts the same loss terms."""

from __future__ import annotations

import math

import pytest
import torch
from contexts import context_config, sample_batch
from tiny_models import make_model
from torch.utils._python_dispatch import TorchDispatchMode

from cpt import CPTModel
from cpt import loss as cpt_loss
from cpt.config import TokenRole, is_label
from cpt.graphs import SEQ_BUCKET, TARGET_BUCKET, pad_batch

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")

# aten ops that read a tensor's value on the host (a device sync, illegal inside a capture)
HOST_READS = ("_local_scalar_dense", "nonzero", "unique", "is_nonzero", "equal", "item")


def trained_model(arch: str = "llama", **kwargs) -> CPTModel:  # type: ignore[no-untyped-def]
    """A decaying context of three examples, moved off its start, on a tiny ``arch`` model."""
    config = context_config(3, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.8)
    base_model = make_model(arch)
    # sdpa: transformers' eager attention makes a CPU tensor in its mask, which a capture refuses
    base_model.set_attn_implementation("sdpa")
    model = CPTModel(base_model, config, **kwargs)
    torch.manual_seed(0)
    with torch.no_grad():
        model.delta.normal_(0, 0.01)
    return model


def _shared_total(model: CPTModel, input_ids: torch.Tensor, targets: cpt_loss.Targets) -> torch.Tensor:
    how = model.execution_plan("loss", *input_ids.shape, context_sharing="on")
    return cpt_loss.shared_total(model.base_model, model.context, input_ids, targets, how)


def loss_and_grad(model: CPTModel, run) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """``run()``'s loss and the gradient it gives ``delta`` (from none)."""
    model.delta.grad = None
    value = run()
    value.backward()
    return value.detach(), model.delta.grad.clone()


def assert_same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Two (loss, gradient) pairs agree: the losses to 1e-5, the gradients to 1e-5 of their norm."""
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=0)
    assert ((a[1] - b[1]).norm() / b[1].norm()).item() <= 1e-5


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        if any(f"aten.{op}" in name for op in HOST_READS):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------- targets


def test_sample_targets_are_label_codes_with_a_label() -> None:
    model = trained_model()
    batch = sample_batch(2)
    codes, targets = cpt_loss.sample_targets(model.context, batch["labels"], batch["input_type_mask"])
    expected = (batch["input_type_mask"] == 4) & (batch["labels"] != -100)
    assert torch.equal(targets, expected)
    moved = batch["input_type_mask"] > 0
    assert torch.equal(codes[moved], batch["input_type_mask"][moved] + model.context.max_code)
    assert (codes[~moved] == 0).all()  # separators and padding stay 0: never a target


def test_without_a_type_mask_every_sample_token_is_a_label_of_its_own_code() -> None:
    model = trained_model()
    labels = sample_batch(2)["labels"]
    codes, targets = cpt_loss.sample_targets(model.context, labels, None)
    assert (codes == int(TokenRole.LABEL) + model.context.max_code).all()
    assert is_label(codes).all() and codes.min() > model.context.max_code  # above every context code
    assert torch.equal(targets, labels != -100)


def test_a_negative_type_code_is_refused_by_every_entry() -> None:
    model = trained_model()
    batch = sample_batch(2)
    batch["input_type_mask"][0, 1] = -1
    entries = [
        lambda: cpt_loss.sample_targets(model.context, batch["labels"], batch["input_type_mask"]),
        lambda: cpt_loss.plan_targets(model.context, batch["labels"], batch["input_type_mask"]),
        lambda: cpt_loss.loss_targets(model.context, batch["labels"], batch["input_type_mask"]),
        lambda: cpt_loss.term_counts(model.context, batch["labels"], batch["input_type_mask"]),
    ]
    for sharing in ("off", "on"):
        model.context_sharing = sharing
        entries.append(lambda: model(**batch))
    for entry in entries:
        with pytest.raises(ValueError, match="type code below 0"):
            entry()


@pytest.mark.parametrize("sharing", ["off", "on"])
def test_batch_without_label_token_is_refused(sharing: str) -> None:
    config = context_config()
    config = type(config)(
        cpt_token_ids=config.cpt_token_ids,
        cpt_tokens_type_mask=[c if c % 4 else 0 for c in config.cpt_tokens_type_mask],
    )
    model = CPTModel(make_model("llama"), config, context_sharing=sharing)
    batch = sample_batch(2)
    batch["labels"][:] = -100  # label-typed sample tokens, but every one ignored
    with pytest.raises(ValueError, match="the batch has no label token"):
        model(**batch)
    with pytest.raises(ValueError, match="the batch has no label token"):
        cpt_loss.require_targets(int(cpt_loss.term_counts(model.context, batch["labels"], None).sum()))


# ---------------------------------------------------------------------- weights


def test_decay_weighs_each_example_by_its_rank_from_the_end() -> None:
    config = context_config(2, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5)
    codes = torch.tensor([config.cpt_tokens_type_mask + [12, 12, 0]])  # context, then a sample label
    weights = cpt_loss.label_weights(codes, config)[0]
    assert weights[-3:-1].tolist() == [1.0, 1.0]  # the sample's label
    assert weights[codes[0] == 8].tolist() == [0.5, 0.5]  # the last context example
    assert weights[codes[0] == 4].tolist() == [0.25, 0.25]  # the one before
    flat = cpt_loss.label_weights(codes, context_config(2))
    assert (flat == 1).all()


def test_position_zero_takes_no_rank() -> None:
    config = context_config(1, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5)
    codes = torch.tensor([[8, 4, 4]])  # 8 at position 0 predicts nothing: 4 is the highest ranked
    assert cpt_loss.label_weights(codes, config)[0, 1:].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------- counts and normalisation


def test_every_path_counts_the_same_loss_terms() -> None:
    model = trained_model()
    batch = sample_batch(4)
    batch["input_type_mask"][1, 0] = 4  # a label at the first sample position, in one row only
    labels, codes = batch["labels"], batch["input_type_mask"]
    per_row = cpt_loss.term_counts(model.context, labels, codes)
    targets = cpt_loss.loss_targets(model.context, labels, codes)
    assert per_row.tolist() == (targets != -100).sum(dim=1).tolist()
    assert cpt_loss.count_targets(targets) == int(per_row.sum())
    counts = {"terms": int(per_row.sum())}
    for sharing in ("off", "on"):
        model.context_sharing = sharing
        counts[sharing] = model(**batch).num_targets
    counts["plan"] = cpt_loss.plan_targets(model.context, labels, codes, batch["attention_mask"]).count
    padded = pad_batch(batch["input_ids"], batch["attention_mask"], labels, codes, multiple=SEQ_BUCKET)
    counts["graphs"] = cpt_loss.plan_targets(model.context, *padded[2:], padded[1], pad_targets_to=TARGET_BUCKET).count
    assert set(counts.values()) == {counts["terms"]}, counts
    # the context's labels come first in each row's targets
    assert torch.equal(targets[0, : model.context.target_ids.numel()], model.context.target_ids)


def test_divisor_is_the_count_or_the_whole_batch_count() -> None:
    assert cpt_loss.divisor(7) == 7
    assert cpt_loss.divisor(7, 21) == 21
    whole = torch.tensor(21.0)
    assert cpt_loss.divisor(7, whole) is whole  # a tensor stays where it is, not read
    for bad in (0, -3, 0.5, math.nan, math.inf, "21", True):
        with pytest.raises(ValueError, match="num_items_in_batch must be a finite number >= 1"):
            cpt_loss.divisor(7, bad)


def test_divisor_checks_shift_labels_against_the_count() -> None:
    model = trained_model()
    batch = sample_batch(2)
    targets = cpt_loss.loss_targets(model.context, batch["labels"], batch["input_type_mask"])
    count = cpt_loss.count_targets(targets)
    assert cpt_loss.divisor(count, shift_labels=targets) == count
    with pytest.raises(ValueError, match=f"shift_labels counts {count} loss terms but the batch has {count + 1}: "
                       "build the batches with cpt.callback.TrainerCollator"):
        cpt_loss.divisor(count + 1, shift_labels=targets)
    with pytest.raises(ValueError, match="shift_labels must be a tensor or None, got list"):
        cpt_loss.divisor(count, shift_labels=targets.tolist())


@pytest.mark.parametrize("sharing", ["off", "on"])
def test_forward_divides_by_num_items_in_batch(sharing: str) -> None:
    model = trained_model(context_sharing=sharing)
    batch = sample_batch(3)
    own = model(**batch)
    output = model(**batch, num_items_in_batch=3 * own.num_targets)
    torch.testing.assert_close(output.loss * 3, own.loss, rtol=1e-6, atol=0)
    tensor = model(**batch, num_items_in_batch=torch.tensor(3.0 * own.num_targets))
    torch.testing.assert_close(tensor.loss, output.loss, rtol=1e-6, atol=0)
    targets = cpt_loss.loss_targets(model.context, batch["labels"], batch["input_type_mask"])
    assert model(**batch, shift_labels=targets).loss == own.loss
    with pytest.raises(ValueError, match="num_items_in_batch"):
        model(**batch, num_items_in_batch=0)
    with pytest.raises(ValueError, match="shift_labels counts"):
        model(**batch, shift_labels=targets[1:])


# ---------------------------------------------------------------------- the two formulations


def test_shared_and_plain_paths_agree() -> None:
    model = CPTModel(make_model("llama"), context_config(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.7))
    with torch.no_grad():
        model.delta.normal_(0, 0.01)
    batch = sample_batch(5)
    results = {}
    for sharing in ("off", "on"):
        model.context_sharing = sharing
        results[sharing] = loss_and_grad(model, lambda: model(**batch).loss)
    # elementwise, tiny gradient entries differ in the last bits; as a whole they agree to 1e-5
    assert_same(results["on"], results["off"])


def test_label_at_first_sample_position_is_scored_from_the_context() -> None:
    model = CPTModel(make_model("llama"), context_config())
    batch = sample_batch(3)
    batch["input_type_mask"][:, 0] = 4  # the sample starts with a label token
    losses = {}
    for sharing in ("off", "on"):
        model.context_sharing = sharing
        losses[sharing] = model(**batch).loss
    torch.testing.assert_close(losses["on"], losses["off"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("shared_attention", ["off", "on"])
def test_padded_target_plan_gives_the_plain_loss(shared_attention: str) -> None:
    model = trained_model(shared_attention=shared_attention)
    batch = sample_batch(4)
    batch["input_type_mask"][1, 0] = 4  # a label at the first sample position, in one row only
    model.context_sharing = "off"
    plain = loss_and_grad(model, lambda: model(**batch).loss)
    for pad in (1, 8):
        plan = cpt_loss.plan_targets(
            model.context, batch["labels"], batch["input_type_mask"], batch["attention_mask"], pad_targets_to=pad
        )
        assert plan.keep.numel() % pad == 0
        shared = loss_and_grad(model, lambda p=plan: _shared_total(model, batch["input_ids"], p) / p.count)
        assert_same(shared, plain)


def test_plan_refuses_a_bad_target_padding() -> None:
    model = trained_model()
    batch = sample_batch(2)
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="pad_targets_to must be an integer >= 1"):
            cpt_loss.plan_targets(model.context, batch["labels"], batch["input_type_mask"], pad_targets_to=bad)


def test_plan_drops_a_mask_without_padding() -> None:
    model = trained_model()
    batch = sample_batch(4)
    plan = cpt_loss.plan_targets(model.context, batch["labels"], batch["input_type_mask"], batch["attention_mask"])
    assert plan.attention_mask is not None  # odd rows are padded
    full = torch.ones_like(batch["attention_mask"])
    unpadded = cpt_loss.plan_targets(model.context, batch["labels"], batch["input_type_mask"], full)
    assert unpadded.attention_mask is None


@pytest.mark.parametrize("shared_attention", ["off", "on"])
def test_shared_pass_reads_nothing_back_from_the_device(shared_attention: str) -> None:
    model = trained_model(shared_attention=shared_attention)
    batch = sample_batch(4)
    args = (model.context, batch["labels"], batch["input_type_mask"], batch["attention_mask"])
    plan = cpt_loss.plan_targets(*args, pad_targets_to=8)
    model.execution_plan("loss", 4, 9)  # the capability probe reads values: it runs once, before
    reads = _HostReads()
    with reads:
        value = _shared_total(model, batch["input_ids"], plan) / plan.count
        value.backward()
    assert reads.seen == []
    # and the check itself can fail: the plan does read values (on the CPU, before the passes)
    with reads:
        cpt_loss.plan_targets(*args)
    assert reads.seen


@needs_cuda
def test_graphed_loss_divides_by_num_items_in_batch_as_forward_does() -> None:
    from cpt.graphs import GraphedLoss

    model = trained_model().cuda()
    model.context_sharing = "on"
    graphed = GraphedLoss(model)
    batch = sample_batch(4)
    count = model(**batch).num_targets
    eager = loss_and_grad(model, lambda: model(**batch, num_items_in_batch=3 * count).loss)
    for _ in range(2):  # the capture, then a replay
        model.delta.grad = None
        input_ids, targets = graphed.prepare(batch)
        value = graphed.backward(input_ids, targets, num_items_in_batch=3 * count)
        assert targets.count == count
        assert_same((value, model.delta.grad.clone()), eager)
