"""Training and evaluating a CPT context on several processes (``torchrun``, ``accelerate launch``).

The trainable state of CPT is one small tensor (``delta``, N x d), so data parallelism needs no
wrapper: every rank holds the whole context, runs the frozen model over its share of each batch,
and the ranks sum their gradients of ``delta`` with one all-reduce per optimizer step. The loss of
every rank is divided by the loss-term count of the whole batch (all micro-batches of the step,
all ranks), so the summed gradient is that of one process on the combined batch, and every rank
takes the same AdamW step and projection: the deltas stay equal without being broadcast.

A base model too large for one device can have its decoder layers sharded with FSDP2
(`shard_base_model`): each layer gathers its weights for its forward and backward passes and
frees them after. Those gathers are collectives, so every rank must run the same passes: a rank
whose share of a micro-batch is empty runs one sample of it with weight 0, and the shared-context
path is taken on every rank or on none.

Processes find each other through the environment ``torchrun`` and ``accelerate launch`` set
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; `init_from_env`).
With one process every function here is a no-op, so single-process code paths do not change.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from cpt import loss
from cpt.model import CPTModel

Batch = dict[str, torch.Tensor]
Backward = Callable[[float], torch.Tensor]


# ---------------------------------------------------------------------- the process group


def world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes files and progress: rank 0, or the only process."""
    return rank() == 0


def launched() -> bool:
    """Whether this process was started by a launcher for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None = None) -> torch.device:
    """Joins the process group a launcher described in the environment, once.

    Uses NCCL on CUDA and gloo on the CPU. On CUDA, each process takes the device
    ``cuda:LOCAL_RANK``.

    Args:
        device: ``"cpu"``, ``"cuda"``, or None (CUDA if available).

    Returns:
        This process's device.

    Raises:
        ValueError: on CUDA, if this process's local rank has no GPU of its own.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"this process has LOCAL_RANK {local_rank} but the machine has {torch.cuda.device_count()} CUDA "
            "device(s): launch at most one process per GPU, or train on the CPU (device \"cpu\")"
        )
    here = torch.device("cuda", local_rank) if use_cuda else torch.device(device or "cpu")
    if use_cuda:
        torch.cuda.set_device(here)
    if launched() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return here


def leave() -> None:
    """Destroys the default process group (the one `init_from_env` joined), if there is one.

    Call it on every rank once the work is done: a group still alive when the interpreter exits
    can abort the process from its communication threads (``terminate called without an active
    exception``) after the work succeeded.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Waits for every rank (nothing with one process)."""
    if world_size() > 1:
        dist.barrier()


def check_same(what: str, facts: dict[str, Any]) -> None:
    """Raises on every rank if the ranks disagree on ``facts`` (nothing with one process).

    Raises:
        ValueError: naming the first fact that differs and each rank's value.
    """
    if world_size() == 1:
        return
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, facts)
    for name in facts:
        values = [ranks_facts.get(name) for ranks_facts in everyone]
        if any(value != values[0] for value in values):
            raise ValueError(f"the ranks disagree on {what}: {name} is {values} on ranks 0..{len(values) - 1}")


# ---------------------------------------------------------------------- data parallelism


def share(items: Sequence[Any], num_ranks: int | None = None, index: int | None = None) -> list[Any]:
    """This rank's contiguous share of ``items``: sizes differ by at most one, the first ranks
    take the extra ones, so concatenating the shares in rank order gives ``items`` back.

    Args:
        items: what to split (a micro-batch's sample indices, texts...).
        num_ranks: defaults to `world_size`.
        index: defaults to `rank`.
    """
    num_ranks = world_size() if num_ranks is None else num_ranks
    index = rank() if index is None else index
    size, extra = divmod(len(items), num_ranks)
    start = index * size + min(index, extra)
    return list(items[start : start + size + (index < extra)])


def gather(items: Sequence[Any]) -> list[Any]:
    """Concatenates every rank's ``items`` in rank order, on every rank (`share`'s inverse)."""
    if world_size() == 1:
        return list(items)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def backward_share(
    model: CPTModel,
    window: Sequence[Sequence[int]],
    collate: Callable[[Sequence[int]], Batch],
    passes: Callable[[Batch, int], tuple[int, Backward]],
) -> float:
    """Forward and backward over this rank's share of each micro-batch of an optimizer step,
    then sums ``delta``'s gradient over the ranks.

    Every rank collates each whole micro-batch once to count its loss terms (on the CPU, no
    collective; `cpt.loss.term_counts`), so each rank's loss is divided by the step's global
    count and the summed gradient is the whole step's. A share without any loss term is skipped,
    or, when the base model is sharded (whose passes are collectives), run with weight 0.

    Args:
        model: the model, the same on every rank.
        window: the step's micro-batches, each a list of sample indices (the whole batch).
        collate: sample indices to a batch.
        passes: the step function (`cpt.train.MicroBatchPass`): ``passes(batch,
            num_items_in_batch)`` returns the batch's count and ``backward(weight)``, which adds
            ``weight`` times the gradient of its loss, normalised by ``num_items_in_batch``, and
            returns the detached loss.

    Returns:
        The step's loss over the combined batch, the same on every rank.

    Raises:
        ValueError: if a micro-batch has no loss term at all (on every rank alike).
    """
    ranks, here = world_size(), rank()
    counts = [_term_counts(model, collate(indices)) for indices in window]  # each (B,)
    for c in counts:
        loss.require_targets(int(c.sum()))
    total = sum(int(c.sum()) for c in counts)
    sharded = is_sharded(model)
    value = torch.zeros((), dtype=torch.float32, device=model.delta.device)
    for indices, count in zip(window, counts):
        mine = share(range(len(indices)), ranks, here)
        weight = 1.0
        if not mine or int(count[mine].sum()) == 0:
            if not sharded:
                continue
            mine, weight = [int(count.argmax())], 0.0  # joins the layers' gathers, adds nothing
        _, backward = passes(collate([indices[i] for i in mine]), total)
        value += backward(weight).float() * weight
    grad = model.delta.grad
    if grad is None:
        grad = model.delta.grad = torch.zeros_like(model.delta)
    if ranks > 1:
        flat = torch.cat([grad.reshape(-1), value.reshape(1)])  # one all-reduce for both
        dist.all_reduce(flat)
        grad.copy_(flat[:-1].view_as(grad))
        value = flat[-1]
    return float(value)


def _term_counts(model: CPTModel, batch: Batch) -> torch.Tensor:
    return loss.term_counts(model.context, batch["labels"], batch.get("input_type_mask"))  # (B,)


# ---------------------------------------------------------------------- sharded base models


_SHARDED = "_cpt_sharded_layers"


def shard_base_model(model: CPTModel, **fsdp_kwargs: Any) -> int:
    """Shards the frozen decoder layers of ``model``'s base model across the ranks with FSDP2
    (``torch.distributed.fsdp.fully_shard``); the context (``base``, ``delta``) and the small
    modules around the layers (embeddings, final norm, head) stay whole on every rank.

    Call it on every rank, after the process group is up and the model is on its device, before
    training. With ``context_sharing="auto"``, the plan then shares the context at every batch
    size (`cpt.plan.resolve`): every rank must run the same passes over the layers, whatever the
    size of its share.

    Args:
        model: the model to shard, in place.
        **fsdp_kwargs: passed to ``fully_shard`` (e.g. ``mesh``, ``reshard_after_forward``). Without
            a ``mesh``, every rank of the process group on the device type of the model's context
            (FSDP2's own default would put a CPU model's shards on the GPU).

    Returns:
        The number of layers sharded.

    Raises:
        ValueError: without a process group, or if the base model has no decoder layers that
            `transformers` marks as such.
    """
    from torch.distributed.fsdp import fully_shard

    from cpt._compat import decoder_layers

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard_base_model needs a process group: launch with torchrun (see init_from_env)")
    if is_sharded(model):
        return len(decoder_layers(model.base_model))
    layers = decoder_layers(model.base_model)
    if not layers:
        raise ValueError(f"{type(model.base_model).__name__} has no decoder layers to shard")
    if "mesh" not in fsdp_kwargs:  # FSDP2's own default is the accelerator's: a CPU model would move to cuda:0
        from torch.distributed.device_mesh import init_device_mesh

        fsdp_kwargs["mesh"] = init_device_mesh(model.delta.device.type, (world_size(),))
    for layer in layers:
        fully_shard(layer, **fsdp_kwargs)
    setattr(model, _SHARDED, True)
    return len(layers)


def is_sharded(model: CPTModel) -> bool:
    """Whether `shard_base_model` sharded ``model``'s layers."""
    return bool(getattr(model, _SHARDED, False))
