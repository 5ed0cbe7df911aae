"""The CPT loss: weighted cross-entropy over the label tokens of context and sample.

This module owns the loss on every path (eager, CUDA graphs, data parallel, `transformers.Trainer`):
which positions are targets (`is_target`; for the samples, `sample_targets`), what they weigh
(`label_weights`), how many there are (`term_counts`, `loss_targets`) and what the weighted sum is
divided by (`divisor`). Other modules ask it; none counts the terms or picks the divisor itself.

Targets are the label tokens (type code > 0 and a multiple of 4) anywhere in ``[context ;
sample]``, each predicted from the position before it. With ``opt_weighted_loss_type="decay"`` the
distinct label codes of a row are ranked from the end: the sample's label weighs 1, the last
context example gamma, the one before gamma**2, ... The loss is the mean over all target
positions of ``weight * cross_entropy``: not divided by the sum of weights (PEFT's reduction).

Two exact formulations compute it (`cpt.plan` picks one): `plain_total` runs ``[context ;
sample]`` for each of the B samples, as PEFT does; `shared_total` runs the context once and the B
samples against its cache (causal attention: the context's states do not depend on the sample),
computing the context's own terms once, weighted by B. For the shared one, everything that
depends on the batch's values is worked out on the CPU first (`plan_targets`), so that its passes
read nothing back from the GPU and can be replayed as a CUDA graph (`cpt.graphs`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from cpt import _compat, passes
from cpt._fields import is_finite, show
from cpt.config import IGNORE_INDEX, CPTConfig, TokenRole, is_label
from cpt.context import Context
from cpt.plan import Plan

Count = int | torch.Tensor
"""A number of loss terms: a Python int, or a tensor as `transformers.Trainer` passes it."""


def label_weights(codes: torch.Tensor, config: CPTConfig) -> torch.Tensor:
    """Loss weight of every position, by the rank of its label code within its row.

    Args:
        codes: (B, T) type codes of the whole sequence ``[context ; sample]`` (sample shifted).
        config: supplies ``opt_weighted_loss_type`` and ``opt_loss_decay_factor``.

    Returns:
        (B, T) float32 weights; only the values at label positions matter.
    """
    weights = torch.ones(codes.shape, dtype=torch.float32, device=codes.device)
    if config.opt_weighted_loss_type != "decay":
        return weights
    labels = is_label(codes)
    labels[:, 0] = False  # position 0 predicts nothing: its code takes no rank (as in PEFT)
    num_codes = int(codes.max()) + 1
    present = torch.zeros(codes.shape[0], num_codes + 1, dtype=torch.long, device=codes.device)  # (B, C+1)
    present.scatter_(1, torch.where(labels, codes, num_codes), 1)
    present[:, num_codes] = 0  # the dump column for non-label positions
    # rank of code c in row b: how many distinct label codes above c the row holds
    above = present.flip(1).cumsum(1).flip(1) - present  # (B, C+1)
    rank = above.gather(1, codes.clamp(max=num_codes))  # (B, T)
    return torch.pow(torch.tensor(config.opt_loss_decay_factor, dtype=torch.float64), rank).float()


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(weights * cross_entropy(logits, targets))`` in float32.

    Args:
        logits: (M, V) logits that predict the targets.
        targets: (M,) token ids.
        weights: (M,) weight of each term.

    Returns:
        0-dim float32 tensor.
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (M,)
    return (ce * weights.to(ce.device)).sum()


@dataclass
class Targets:
    """Where the loss terms of a batch are and what they weigh, for `shared_total` (made by
    `plan_targets`). K is the number of sample positions whose logits are kept.

    Attributes:
        keep: (K,) sample positions whose next-token logits are computed.
        labels: (B, K) the target at ``keep + 1`` in each row (0 where there is none).
        weights: (B, K) float32 weight of each of those terms, 0 where there is no target.
        first_labels: (B,) the target at sample position 0, predicted by the context's last
            position (0 where there is none).
        first_weights: (B,) float32, 0 where there is no target.
        context_weights: (Mc,) float32 weight of each of the context's own targets, summed over
            the B rows.
        attention_mask: (B, S) where the batch has padding, else None.
        count: target positions the loss averages over (a Python int, known before any pass).
    """

    keep: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    first_labels: torch.Tensor
    first_weights: torch.Tensor
    context_weights: torch.Tensor
    attention_mask: torch.Tensor | None
    count: int

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Every field but ``count``, by name (`from_tensors` takes them back)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "count"}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor | None], count: int) -> Targets:
        """The targets whose `tensors` are ``tensors`` (other keys ignored)."""
        return cls(**{f.name: tensors[f.name] for f in fields(cls) if f.name != "count"}, count=count)

    def to(self, device: torch.device) -> Targets:
        """The targets with their tensors on ``device`` (copied without blocking the host)."""
        moved = {k: None if v is None else passes.to_device(v, device) for k, v in self.tensors().items()}
        return replace(self, **moved)


def check_type_codes(input_type_mask: torch.Tensor | None) -> None:
    """Raises ValueError on a negative type code."""
    if input_type_mask is not None and bool((input_type_mask < 0).any()):
        raise ValueError(f"input_type_mask has a type code below 0: {int(input_type_mask.min())}")


def sample_codes(context: Context, input_ids: torch.Tensor, input_type_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, S) type codes of the samples, moved above the context's so the two never collide;
    every token a label (as PEFT) where ``input_type_mask`` is None."""
    if input_type_mask is None:  # the label code of a first example, moved like the others
        return torch.full_like(input_ids, int(TokenRole.LABEL) + context.max_code)
    codes = input_type_mask.to(device=input_ids.device, dtype=torch.long)
    return torch.where(codes > 0, codes + context.max_code, codes)


def is_target(codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Where a position is a loss target: a label's type code (`cpt.config.is_label`) with a
    label other than -100. Of a whole sequence ``[context ; sample]``, position 0 has no
    predictor: the caller drops it.

    Args:
        codes: type codes, any shape (sample codes moved by `sample_codes`).
        labels: the target ids, the same shape.

    Returns:
        Bool tensor of that shape.
    """
    return is_label(codes) & (labels != IGNORE_INDEX)


def sample_targets(
    context: Context, labels: torch.Tensor, input_type_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which sample positions are loss targets (`is_target` of the moved codes), on the device
    of ``labels``: what the shared plan, `loss_targets` and `term_counts` count.

    Args:
        context: the context (its highest type code is read).
        labels: (B, S) target ids; -100 marks ignored positions.
        input_type_mask: (B, S) sample type codes 0..4, or None (every token a label).

    Returns:
        ``(codes, targets)``: (B, S) long type codes (`sample_codes`) and (B, S) bool.

    Raises:
        ValueError: on a negative type code.
    """
    check_type_codes(input_type_mask)
    codes = sample_codes(context, labels, input_type_mask)
    return codes, is_target(codes, labels)


def plan_targets(
    context: Context,
    labels: torch.Tensor,
    input_type_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    pad_targets_to: int = 1,
) -> Targets:
    """Where a batch's loss terms are and what they weigh, worked out on the CPU (tensors given
    on a GPU are copied once).

    Args:
        context: the context (its CPU-side codes and target positions are read).
        labels: (B, S) target ids; -100 marks ignored positions.
        input_type_mask: (B, S) sample type codes 0..4, or None (every token a label).
        attention_mask: (B, S) 0/1, or None.
        pad_targets_to: round the number of kept sample positions up to a multiple of this
            (padding terms weigh 0), so that fewer distinct shapes occur.

    Raises:
        ValueError: on a negative type code, a batch without any label token, or
            ``pad_targets_to`` below 1.
    """
    if isinstance(pad_targets_to, bool) or not isinstance(pad_targets_to, int) or pad_targets_to < 1:
        raise ValueError(f"pad_targets_to must be an integer >= 1, got {pad_targets_to!r}")
    labels, type_mask = _on_cpu(labels, input_type_mask)
    codes, targets = sample_targets(context, labels, type_mask)  # (B, S) each
    batch_size = labels.shape[0]
    positions = context.cpu_target_positions
    full_codes = torch.cat([context.cpu_codes.expand(batch_size, -1), codes], dim=1)  # (B, N+S)
    weights = label_weights(full_codes, context.config)  # (B, N+S)
    sample_weights = weights[:, context.num_tokens :]  # (B, S)

    count = batch_size * positions.numel() + int(targets.sum())
    require_targets(count)
    first = targets[:, 0]  # predicted from the context's last position
    rest = targets.clone()
    rest[:, 0] = False
    keep = rest.any(dim=0).nonzero(as_tuple=True)[0] - 1  # positions predicting a target
    kept = rest[:, keep + 1]  # (B, K) which rows have a target there
    zero = torch.zeros((), dtype=torch.float32)
    kept_labels = torch.where(kept, labels[:, keep + 1], 0)
    kept_weights = torch.where(kept, sample_weights[:, keep + 1], zero)
    padding = max(1, -(-keep.numel() // pad_targets_to) * pad_targets_to) - keep.numel()
    if padding:  # terms at position 0 that weigh nothing
        keep = torch.cat([keep, keep.new_zeros(padding)])
        kept_labels = torch.cat([kept_labels, kept_labels.new_zeros(batch_size, padding)], dim=1)
        kept_weights = torch.cat([kept_weights, kept_weights.new_zeros(batch_size, padding)], dim=1)

    has_padding = attention_mask is not None and not bool(attention_mask.cpu().all())
    return Targets(
        keep=keep,
        labels=kept_labels,
        weights=kept_weights,
        first_labels=torch.where(first, labels[:, 0], 0),
        first_weights=torch.where(first, sample_weights[:, 0], zero),
        context_weights=weights[:, positions].sum(dim=0),  # each term counts once per row
        attention_mask=attention_mask if has_padding else None,  # all ones: the same as none
        count=count,
    )


def shared_total(
    model: nn.Module, context: Context, input_ids: torch.Tensor, targets: Targets, how: Plan
) -> torch.Tensor:
    """The weighted sum of the batch's cross-entropy terms (the loss is it over
    ``targets.count``): the context runs once, the samples against its cache.

    Reads nothing back from the GPU, so it can be captured in a CUDA graph.

    Args:
        model: the frozen base model.
        context: the context.
        input_ids: (B, S) sample ids.
        targets: from `plan_targets`, on the model's device (`Targets.to`).
        how: the execution plan (its ``one_copy`` and ``causal_context`` are read).

    Returns:
        0-dim float32 tensor.
    """
    input_ids = passes.to_device(input_ids, context.delta.device)
    batch_size = input_ids.shape[0]
    embeds = passes.embed(model, input_ids)  # (B, S, d)
    # The context, once: its KV cache keeps the gradient to delta.
    context_logits, cache = passes.context_pass(model, context, embeds.dtype, context.keep, causal=how.causal_context)
    # (Mc + 1, V): the context's targets, then its last position
    states = _compat.cache_tensors(cache)
    sample_logits = passes.against_context(
        model, context, embeds, targets.attention_mask, states, targets.keep, one_copy=how.one_copy
    )  # (B, K, V)

    total = weighted_cross_entropy(context_logits[:-1], context.target_ids, targets.context_weights)
    last = context_logits[-1:].expand(batch_size, -1)  # (B, V)
    total = total + weighted_cross_entropy(last, targets.first_labels, targets.first_weights)
    vocab = sample_logits.shape[-1]
    return total + weighted_cross_entropy(
        sample_logits.reshape(-1, vocab), targets.labels.reshape(-1), targets.weights.reshape(-1)
    )


def plain_total(
    model: nn.Module,
    context: Context,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    input_type_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """The weighted sum of the batch's cross-entropy terms by the plain path (0-dim float32), and
    how many target positions there are (the loss is the one over the other).

    Raises:
        ValueError: on a negative type code or a batch without any label token.
    """
    device = context.delta.device
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    check_type_codes(input_type_mask)
    codes = sample_codes(context, input_ids, input_type_mask)  # (B, S)
    batch_size = input_ids.shape[0]
    full_codes = torch.cat([context.codes.expand(batch_size, -1), codes], dim=1)  # (B, N+S)
    full_labels = torch.cat([context.ids.expand(batch_size, -1), labels.to(device)], dim=1)
    full_targets = is_target(full_codes, full_labels)  # (B, N+S)
    full_targets[:, 0] = False  # the first position has no predictor
    rows, positions = full_targets.nonzero(as_tuple=True)
    require_targets(rows.numel())
    keep = torch.unique(positions - 1)  # sorted hidden positions that predict a target
    logits = passes.plain(model, context, passes.embed(model, input_ids), attention_mask, keep)
    logits = logits[rows, torch.searchsorted(keep, positions - 1)]  # (M, V)
    weights = label_weights(full_codes, context.config)[rows, positions]  # (M,)
    return weighted_cross_entropy(logits, full_labels[rows, positions], weights), rows.numel()


def batch_loss(
    model: nn.Module,
    context: Context,
    how: Plan,
    batch: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
    *,
    num_items_in_batch: Count | None = None,
    shift_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """The CPT loss of a batch by the formulation ``how`` chooses (`shared_total` or
    `plain_total`: the same number), and its number of loss terms.

    Args:
        model: the frozen base model.
        context: the context.
        how: the execution plan (`cpt.plan.resolve`).
        batch: ``(input_ids, attention_mask, labels, input_type_mask)``, each (B, S), on the CPU
            or the model's device.
        num_items_in_batch, shift_labels: see `divisor`.

    Returns:
        ``(loss, count)``: the 0-dim float32 loss and the batch's own number of loss terms.

    Raises:
        ValueError: on a negative type code, a batch without any label token, or a bad
            ``num_items_in_batch`` or ``shift_labels``.
    """
    input_ids, attention_mask, labels, input_type_mask = batch
    if how.shared:
        targets = plan_targets(context, labels, input_type_mask, attention_mask)
        total = shared_total(model, context, input_ids, targets.to(context.delta.device), how)
        count = targets.count
    else:
        total, count = plain_total(model, context, *batch)
    return total / divisor(count, num_items_in_batch, shift_labels), count


def require_targets(count: int) -> None:
    """Raises ValueError where a batch has no target position."""
    if count == 0:
        raise ValueError(
            "the batch has no label token: no position has a type code that is a positive multiple "
            "of 4 with a label other than -100"
        )


def loss_targets(context: Context, labels: torch.Tensor, input_type_mask: torch.Tensor | None) -> torch.Tensor:
    """The token ids the CPT loss predicts for each row of a batch, worked out on the CPU; their
    count (entries other than -100, `count_targets`) is the batch's number of loss terms, what
    ``num_items_in_batch`` sums over micro-batches and ranks.

    Args:
        context: the model's context.
        labels: (B, S) target ids; -100 marks ignored positions.
        input_type_mask: (B, S) sample type codes 0..4, or None (every token a label).

    Returns:
        (B, Mc + S) long: the context's Mc label tokens, then the sample's labels where they are
        targets, -100 elsewhere.
    """
    labels, type_mask = _on_cpu(labels, input_type_mask)
    _, targets = sample_targets(context, labels, type_mask)  # (B, S)
    ids = context.target_ids.to(labels.device).expand(labels.shape[0], -1)  # (B, Mc)
    return torch.cat([ids, torch.where(targets, labels, IGNORE_INDEX)], dim=1)


def term_counts(context: Context, labels: torch.Tensor, input_type_mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) long: the number of loss terms of each row, worked out on the CPU (the context's Mc
    once per row, and the row's sample targets); they sum to the batch's ``count``.

    Raises:
        ValueError: on a negative type code.
    """
    labels, type_mask = _on_cpu(labels, input_type_mask)
    _, targets = sample_targets(context, labels, type_mask)  # (B, S)
    return targets.sum(dim=1) + context.cpu_target_positions.numel()


def count_targets(targets: torch.Tensor) -> int:
    """The number of loss terms in ``targets`` from `loss_targets`: its entries other than -100."""
    return int((targets != IGNORE_INDEX).sum())


def divisor(count: int, num_items_in_batch: Count | None = None, shift_labels: torch.Tensor | None = None) -> Count:
    """What a batch's weighted sum is divided by to give its loss: its own ``count`` of loss
    terms, or ``num_items_in_batch``, the count of the whole batch it belongs to (every
    micro-batch of an optimizer step, on every rank, as `transformers.Trainer` passes it), so that
    the gradients summed over the parts are those of the whole.

    Args:
        count: the batch's own number of loss terms.
        num_items_in_batch: None, or a finite number >= 1; a tensor is taken as it is (reading it
            would make the host wait for the device).
        shift_labels: None, or this batch's `loss_targets` (`cpt.callback.TrainerCollator` adds
            them so that `Trainer` counts as CPT does): their count must be ``count``.

    Raises:
        ValueError: on a ``num_items_in_batch`` below 1 or not finite, or ``shift_labels`` that
            are not a tensor or count otherwise.
    """
    if shift_labels is not None:
        if not isinstance(shift_labels, torch.Tensor):
            raise ValueError(f"shift_labels must be a tensor or None, got {type(shift_labels).__name__}")
        counted = count_targets(shift_labels)
        if counted != count:
            raise ValueError(
                f"shift_labels counts {counted} loss terms but the batch has {count}: build the batches "
                "with cpt.callback.TrainerCollator for this model's context"
            )
    if num_items_in_batch is None:
        return count
    if not isinstance(num_items_in_batch, torch.Tensor) and not (
        is_finite(num_items_in_batch) and num_items_in_batch >= 1
    ):
        raise ValueError(f"num_items_in_batch must be a finite number >= 1, got {show(num_items_in_batch)}")
    return num_items_in_batch


def _on_cpu(
    labels: torch.Tensor, input_type_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    cpu = torch.device("cpu")
    return labels.to(cpu), None if input_type_mask is None else input_type_mask.to(cpu)
