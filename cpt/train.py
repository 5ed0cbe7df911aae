"""Training a CPT context: AdamW on ``delta``, then the projection, after every optimizer step.

Context-aware Prompt Tuning (Blau et al., arXiv 2410.17222) refines the embeddings of a few-shot
context by projected gradient descent: an AdamW step on the offset ``delta``, then every row of
``delta`` is put back into its L2 ball (`CPTModel.project_`). This module owns that loop:

- `train` runs it, with gradient accumulation, optional bf16 autocast, gradient clipping,
  periodic evaluation, a tqdm bar showing the running loss, and checkpoints;
- checkpoints (`cpt.checkpoint`: `save_checkpoint` / `load_checkpoint`) every few steps and at
  the end, each replacing the previous one as a whole;
- `CPTProjectionCallback` gives users of `transformers.Trainer` the same projection step.

Gradient accumulation matches one big batch: each micro-batch's loss is weighted by its number of
label positions and the summed gradient is divided by the window's total, so ``k`` micro-batches
of ``b`` samples give the gradient of one batch of ``k * b`` samples (the CPT loss is a mean over
label positions), not the mean of ``k`` means.

The sample order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)`` alone, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence, Sized
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from cpt import _compat, _io, distributed, graphs
from cpt._fields import check_instance, check_path, check_seed, is_finite, show
from cpt.checkpoint import LAST_CHECKPOINT_NAME, Selection, TrainState, fingerprint, load_checkpoint, save_checkpoint
from cpt.config import check_trainable
from cpt.data import epoch_steps
from cpt.numerics import check_finite_step
from cpt.model import CPTModel
from cpt.plan import Choice, Why, choice

logger = logging.getLogger(__name__)

MixedPrecision = Literal["auto", "bf16", "no"]
MIXED_PRECISION_MODES = ("auto", "bf16", "no")
CudaGraphs = Choice

Batch = dict[str, torch.Tensor]
EvalFn = Callable[[CPTModel], Mapping[str, float]]

ADAM_BETAS = (0.9, 0.999)
"""AdamW's moment decays (torch's defaults, as PEFT's example and ``transformers.Trainer`` use)."""


def _largest_learning_rate() -> float:
    """The largest rate whose first AdamW step size, ``lr / (1 - beta1)``, is a float32.

    AdamW steps ``delta`` (float32) by ``lr / (1 - beta1 ** t)`` times the normalised moment; the
    bias correction ``1 - beta1 ** t`` is smallest at step 1, and torch converts the step size to
    the parameter's dtype, so a larger rate fails at the first step.
    """
    largest, correction = torch.finfo(torch.float32).max, 1 - ADAM_BETAS[0]
    rate = largest * correction
    while rate / correction > largest:  # float64 rounding: settle on the exact boundary
        rate = math.nextafter(rate, 0.0)
    while math.nextafter(rate, math.inf) / correction <= largest:
        rate = math.nextafter(rate, math.inf)
    return rate


MAX_LEARNING_RATE = _largest_learning_rate()
"""The largest learning rate AdamW can step float32 parameters with (about 3.4e37)."""
SMALLEST_NORMAL = torch.finfo(torch.float32).tiny
"""The smallest learning rate and gradient-norm bound (about 1.2e-38): AdamW and the clipping
compute in float32, where a smaller (subnormal) number may flush to 0, and 1e-320 is 0 outright,
so the context would never move while training reported every step."""


class Selector(Protocol):
    """What an ``eval_fn`` keeps between its calls (`cpt.selection.LeaveOneOut`): checkpoints carry
    its ``state`` and a resume puts it back, since the run's result depends on it."""

    state: Selection


@dataclass
class TrainConfig:
    """How `train` optimises a CPT context.

    Args:
        learning_rate: AdamW's step size, a normal float32 (`SMALLEST_NORMAL` up) at most
            `MAX_LEARNING_RATE` (the first step divides it by ``1 - beta1``, and the quotient
            must be a float32).
        epochs: passes over the dataset; ignored when ``max_steps`` is set.
        batch_size: samples per forward pass (micro-batch).
        gradient_accumulation_steps: micro-batches per optimizer step.
        weight_decay: AdamW's decoupled weight decay on ``delta`` (pulls it towards 0, the
            original context); ``learning_rate * weight_decay`` at most 1.
        max_steps: if set, train for exactly this many optimizer steps, cycling epochs as
            needed (as in ``transformers``); ``epochs`` is then ignored.
        seed: seeds the sample order (with the epoch) and, on a fresh run, the global torch and
            Python RNGs; an integer in [0, 2**64 - 1] (torch's generators take 64 bits).
        eval_every: call ``eval_fn`` every this many optimizer steps; None never.
        checkpoint_every: save a checkpoint every this many optimizer steps; None only at the end
            (when a ``checkpoint_dir`` is given).
        log_every: the running loss (bar and log) averages the last this many steps, and is
            logged at INFO level every this many steps.
        progress: show a tqdm progress bar.
        mixed_precision: ``"auto"`` runs the forward pass under bf16 autocast on CUDA (where bf16
            is supported) and in full precision elsewhere; ``"bf16"`` forces bf16 autocast;
            ``"no"`` never autocasts. ``delta``, the optimizer and the projection stay float32.
        max_grad_norm: clip the gradient's L2 norm to this (at least `SMALLEST_NORMAL`) before
            each step; None never clips.
        shard_base_model: with several processes (``torchrun``), shard the frozen decoder
            layers across them with FSDP2 (`cpt.distributed.shard_base_model`), for a base model
            too large for one device; no effect with one process. Does not combine with CUDA
            graphs (``cuda_graphs="on"`` is refused, ``"auto"`` runs eagerly and says so).
        cuda_graphs: ``"auto"`` replays each step's forward and backward from a CUDA graph
            (`cpt.graphs`) when the model is on a CUDA device and shares its context, which
            removes the launch overhead that bounds small models; ``"on"`` requires it;
            ``"off"`` always runs eagerly.

    Raises:
        ValueError: naming the bad field and value.
    """

    # cpt's recipe, chosen on the development half of benchmarks/accuracy.py (docs/tuning.md):
    # PEFT's example (1e-4, 5 epochs) moved the rows of a few-example context by a third of their
    # radius, so the trained context classified almost exactly as the untrained one. At 1e-3 the
    # rows reach their (larger) balls within a few dozen steps; fit keeps the best context seen
    # by leave-one-out, which guards against the longer run.
    learning_rate: float = 1e-3
    epochs: int = 10
    batch_size: int = 1  # the reference recipe: one sample per step, the context shared anyway
    gradient_accumulation_steps: int = 1  # no accumulation: each micro-batch is a step
    # 0, as transformers.Trainer (what PEFT's example uses): the L2 balls already keep delta small
    weight_decay: float = 0.0
    max_steps: int | None = None  # None: epochs decide
    seed: int = 0
    eval_every: int | None = None  # None: no periodic evaluation
    checkpoint_every: int | None = None  # None: a checkpoint only at the end
    log_every: int = 10  # a smooth enough running loss at a few steps per epoch
    progress: bool = True
    mixed_precision: MixedPrecision = "auto"
    max_grad_norm: float | None = 1.0  # transformers.Trainer's default, which PEFT's example uses
    cuda_graphs: CudaGraphs = "auto"
    shard_base_model: bool = False  # one device holds the whole model unless asked

    def __post_init__(self) -> None:
        _check_number("learning_rate", self.learning_rate, minimum=SMALLEST_NORMAL, inclusive=True, maximum=MAX_LEARNING_RATE)
        _check_number("weight_decay", self.weight_decay, minimum=0.0, inclusive=True)
        if self.learning_rate * self.weight_decay > 1:
            raise ValueError(
                f"learning_rate * weight_decay must be at most 1, got {show(self.learning_rate)} * "
                f"{show(self.weight_decay)}: AdamW multiplies delta by 1 - learning_rate * weight_decay "
                "each step, and above 1 that flips its sign instead of decaying it"
            )
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, minimum=SMALLEST_NORMAL, inclusive=True)
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "log_every"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("max_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        check_seed("seed", self.seed)
        for name in ("progress", "shard_base_model"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.mixed_precision not in MIXED_PRECISION_MODES:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION_MODES}, got {self.mixed_precision!r}"
            )
        self.cuda_graphs = choice("cuda_graphs", self.cuda_graphs)
        self.learning_rate = float(self.learning_rate)
        self.weight_decay = float(self.weight_decay)
        if self.max_grad_norm is not None:
            self.max_grad_norm = float(self.max_grad_norm)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def total_steps(self, num_samples: int) -> int:
        """The optimizer steps `train` takes over ``num_samples`` samples: ``max_steps``, else
        ``epochs`` epochs (`cpt.data.epoch_steps`)."""
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * epoch_steps(num_samples, self.batch_size, self.gradient_accumulation_steps)[1]


@dataclass
class TrainResult:
    """What `train` did, over the whole run (a resumed run includes what came before).

    Attributes:
        losses: the loss of every optimizer step, in order (a label-weighted mean over the
            step's micro-batches, i.e. the loss of the step's whole batch).
        steps: optimizer steps done in total.
        eval_history: ``{"step": s, **eval_fn(model)}`` for every evaluation.
        wall_time: seconds this call took (checkpoints and evaluations included).
        epoch: completed epochs plus the fraction of the current one.
    """

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    eval_history: list[dict[str, float]] = field(default_factory=list)
    wall_time: float = 0.0
    epoch: float = 0.0


# ---------------------------------------------------------------------- training


def train(
    model: CPTModel,
    dataset: Sequence[Any],
    config: TrainConfig,
    *,
    collator: Callable[[list[Any]], Batch],
    eval_fn: EvalFn | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    selector: Selector | None = None,
) -> TrainResult:
    """Trains ``model``'s context by projected AdamW.

    Each optimizer step: forward and backward over ``gradient_accumulation_steps`` micro-batches
    of ``batch_size`` samples, clip, AdamW step on ``model.trainable_parameters()``, then
    ``model.project_()``. The base model is in eval mode throughout (frozen, no dropout).

    In a process group of several ranks (``torchrun``, `cpt.distributed.init_from_env`), each
    rank runs its share of every micro-batch (``batch_size`` is the whole batch) and the ranks
    sum their gradients, so every rank trains the context one process would on the combined
    batch; only rank 0 writes checkpoints and shows progress; ``eval_fn`` runs on every rank.

    Args:
        model: the model to train, in place; batches go to the device of ``model.delta``.
        dataset: indexable samples (e.g. `cpt.data.CPTDataset`), ``len`` >= 1.
        config: the hyper-parameters.
        collator: turns a list of samples into a batch, a dict with ``input_ids``,
            ``attention_mask``, ``labels`` and ``input_type_mask``, each (B, S)
            (e.g. `cpt.data.CPTCollator`).
        eval_fn: called as ``eval_fn(model)`` under ``torch.no_grad()`` every
            ``config.eval_every`` steps; returns metrics (str -> float).
        checkpoint_dir: where ``checkpoint_dir / "last"`` is saved every
            ``config.checkpoint_every`` steps and at the end.
        resume_from: a checkpoint folder (from `save_checkpoint`) to continue from; the result
            is bit-for-bit that of an uninterrupted run with the same config on the CPU; on a GPU
            up to the run-to-run rounding of its kernels (atomic sums, and a step that captures a
            CUDA graph runs eagerly). The checkpoint must come from the same config's sample-order
            fields, the same context and the same training samples (`cpt.checkpoint.fingerprint`).
        selector: the state ``eval_fn`` keeps to choose a result (`cpt.selection.LeaveOneOut`):
            saved with every checkpoint and restored on a resume.

    Returns:
        A `TrainResult` over the whole run.

    Raises:
        ValueError: on an argument of the wrong type, an empty dataset, ``checkpoint_every``
            without ``checkpoint_dir``, a ``checkpoint_dir`` that cannot be written
            (`cpt._io.check_target`, before any step), a context
            that cannot be trained (`cpt.config.check_trainable`), a sample that does not fit after
            the context in the model's positions, or a checkpoint that is not sound or does not
            match the model, the data, the config or the selection (nothing changes then).
        cpt.numerics.NonFiniteError: at the first step whose loss or gradient is NaN or infinite.
    """
    start_time = time.perf_counter()
    _check_arguments(model, dataset, config, collator, eval_fn, checkpoint_dir, resume_from)
    if config.checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("checkpoint_every is set but checkpoint_dir is None: where would checkpoints go?")
    if checkpoint_dir is not None:  # refused now, not at the first checkpoint
        _io.check_target(Path(checkpoint_dir) / LAST_CHECKPOINT_NAME)
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError("dataset is empty: nothing to train on")
    check_trainable(model.config)  # a row to train, and labels the loss can target
    _check_samples_fit(model, dataset)

    model.eval()  # the base model is frozen: no dropout; delta still gets its gradient
    if config.shard_base_model and distributed.world_size() > 1:
        distributed.shard_base_model(model)
    optimizer = make_optimizer(model, config)
    folder = None if checkpoint_dir is None else Path(checkpoint_dir) / LAST_CHECKPOINT_NAME
    data = None if folder is None and resume_from is None else fingerprint(model.config, dataset)
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, model, optimizer, config=config, num_samples=num_samples, fingerprint=data,
            selection=selector is not None,
        )
        if selector is not None:
            selector.state = state.selection
    else:
        state = TrainState()
        _seed_everything(config.seed)

    if distributed.world_size() > 1:  # each rank takes its share of the same batches, from the same start
        facts = {f"config.{name}": value for name, value in config.to_dict().items() if name != "progress"}
        facts.update(num_samples=num_samples, step=state.step)
        facts["context"] = (float(model.base.sum()), float(model.delta.detach().sum()))
        distributed.check_same("what to train", facts)
    batches_per_epoch, _ = epoch_steps(num_samples, config.batch_size, config.gradient_accumulation_steps)
    total_steps = config.total_steps(num_samples)
    device = model.delta.device
    autocast = _autocast(config.mixed_precision, device)
    passes = MicroBatchPass(model, _graphed_loss(model, config, autocast is not nullcontext), autocast)

    def collate(indices: Sequence[int]) -> Batch:
        return collator([dataset[i] for i in indices])

    def save() -> None:  # with the selection's state as it is now (each evaluation changes it)
        state.selection = None if selector is None else selector.state
        _save_on_main(folder, model, optimizer, state, config, num_samples, data)

    saved_at = state.step if resume_from is not None else -1

    initial = min(state.step, total_steps)
    show = config.progress and distributed.is_main()  # one bar for all ranks
    bar = tqdm(total=total_steps, initial=initial, disable=not show, desc="cpt", unit="step")
    size, accumulation = config.batch_size, config.gradient_accumulation_steps
    try:
        while state.step < total_steps:
            order = epoch_order(num_samples, config.seed, state.epoch)  # (num_samples,)
            batches = [order[i : i + size] for i in range(0, num_samples, size)]
            while state.position < len(batches) and state.step < total_steps:
                window = batches[state.position : state.position + accumulation]
                loss = _optimizer_step(model, optimizer, config, window, collate, passes, step=state.step + 1)
                state.position += len(window)
                state.step += 1
                state.losses.append(loss)
                if state.position >= len(batches):  # the epoch is done: point at the next one
                    state.epoch, state.position = state.epoch + 1, 0
                _report(bar, state, config)
                if eval_fn is not None and _due(state.step, config.eval_every):
                    state.eval_history.append(_evaluate(model, eval_fn, state.step))
                if folder is not None and _due(state.step, config.checkpoint_every):
                    save()
                    saved_at = state.step
                if state.position == 0:
                    break  # a new epoch: a new order
    finally:
        bar.close()
    if folder is not None and saved_at != state.step:
        save()

    return TrainResult(
        losses=list(state.losses),
        steps=state.step,
        eval_history=list(state.eval_history),
        wall_time=time.perf_counter() - start_time,
        epoch=state.epoch + state.position / batches_per_epoch,
    )


def make_optimizer(model: CPTModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model.trainable_parameters()`` with the config's learning rate and decay."""
    return torch.optim.AdamW(
        model.trainable_parameters(), lr=config.learning_rate, betas=ADAM_BETAS, weight_decay=config.weight_decay
    )


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of an epoch: a permutation that depends only on ``(seed, epoch)``.

    Returns:
        A permutation of ``range(num_samples)``.
    """
    digest = hashlib.sha256(f"cpt-epoch-order:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(num_samples, generator=generator).tolist()


Backward = Callable[[float], torch.Tensor]
"""``backward(scale)``: adds ``scale`` times the gradient of a micro-batch's loss to ``delta.grad``
and returns the detached loss."""


@dataclass(frozen=True)
class MicroBatchPass:
    """The step function of `train`: one micro-batch's forward and backward passes, eager or
    replayed from CUDA graphs (`cpt.graphs.GraphedLoss`), the same for one process and for many
    (`cpt.distributed.backward_share`).

    Calling it readies the pass of a batch and returns ``(count, backward)``: the batch's number
    of loss terms, known before ``backward`` is called, so that the caller can choose the scale
    from it; and the `Backward` that runs the pass. The loss is the batch's weighted sum over
    ``cpt.loss.divisor(count, num_items_in_batch)``.

    Attributes:
        model: the model being trained.
        graphed: the CUDA-graphed loss, or None for eager passes.
        autocast: a context manager factory for the eager forward pass.
    """

    model: CPTModel
    graphed: graphs.GraphedLoss | None
    autocast: Callable[[], Any]

    def __call__(self, batch: Batch, num_items_in_batch: int | None = None) -> tuple[int, Backward]:
        if self.graphed is not None:  # the replay runs the forward pass with the backward one
            input_ids, targets = self.graphed.prepare(batch)
            replay = functools.partial(self.graphed.backward, input_ids, targets, num_items_in_batch=num_items_in_batch)
            return targets.count, lambda scale: replay(scale=scale)
        with self.autocast():
            output = self.model(**batch, num_items_in_batch=num_items_in_batch)

        def backward(scale: float) -> torch.Tensor:
            (output.loss * scale).backward()
            return output.loss.detach()

        return output.num_targets, backward


def _optimizer_step(
    model: CPTModel,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    window: list[list[int]],
    collate: Callable[[Sequence[int]], Batch],
    passes: MicroBatchPass,
    step: int = 0,
) -> float:
    """One projected AdamW step over the micro-batches of ``window``; returns the step's loss.

    Batches stay on the CPU where the collator makes them: the model reads the loss's targets
    there and copies the rest to its device without making the host wait.

    Raises:
        cpt.numerics.NonFiniteError: before the update, if the loss or the gradient is NaN or infinite.
    """
    params = model.trainable_parameters()
    optimizer.zero_grad(set_to_none=True)
    if distributed.world_size() > 1:
        loss = distributed.backward_share(model, window, collate, passes)
    else:
        loss = _backward_window(model, window, collate, passes)
    return _finish_step(model, optimizer, config, params, loss, step)


def _backward_window(
    model: CPTModel, window: list[list[int]], collate: Callable[[Sequence[int]], Batch], passes: MicroBatchPass
) -> float:
    """Forward and backward over the micro-batches of ``window`` on one process; returns the
    window's loss. Each micro-batch counts by its loss terms, so the window's loss and gradient
    are those of one big batch (a lone micro-batch keeps its plain gradient: weight 1)."""
    weighted_loss = torch.zeros((), dtype=torch.float32, device=model.delta.device)
    total_weight = 0
    for indices in window:
        count, backward = passes(collate(indices))
        weight = count if len(window) > 1 else 1
        weighted_loss += backward(weight).float() * weight
        total_weight += weight
    if total_weight != 1:
        for param in model.trainable_parameters():
            if param.grad is not None:
                param.grad.div_(total_weight)
    return (weighted_loss / total_weight).item()


def _finish_step(
    model: CPTModel, optimizer: torch.optim.Optimizer, config: TrainConfig, params: list, loss: float, step: int
) -> float:
    """Checks the loss and gradient are finite, clips the gradient, steps and projects; returns ``loss``."""
    check_finite_step(loss, params, step)  # before the update: delta stays as it was
    if config.max_grad_norm is not None:
        nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    model.project_()  # the "P" of PGD: every row back into its ball
    optimizer.zero_grad(set_to_none=True)
    return loss


def _due(step: int, every: int | None) -> bool:
    return every is not None and step % every == 0


def _graphed_loss(model: CPTModel, config: TrainConfig, autocast: bool) -> graphs.GraphedLoss | None:
    """The CUDA-graphed loss `train` uses, or None for eager passes, as the model's plan says.

    Raises:
        ValueError: for ``cuda_graphs="on"`` where graphs cannot run.
    """
    how = model.execution_plan("train", config.batch_size, 1, cuda_graphs=config.cuda_graphs)
    if how.why_no_graphs is Why.SHARDED and model.delta.is_cuda and distributed.is_main():
        logger.warning("CUDA graphs are off: %s", how.why_no_graphs.value)  # once per run: "auto" would use them here
    return graphs.GraphedLoss(model, autocast=autocast) if how.graphs else None


def _autocast(mode: MixedPrecision, device: torch.device) -> Callable[[], Any]:
    if mode == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        use_bf16 = mode == "bf16"
    if not use_bf16:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _evaluate(model: CPTModel, eval_fn: EvalFn, step: int) -> dict[str, float]:
    with torch.no_grad():
        metrics = eval_fn(model)
    model.eval()  # in case eval_fn switched modes
    if not isinstance(metrics, Mapping):
        raise ValueError(f"eval_fn must return a mapping of names to floats, got {type(metrics).__name__}")
    return {"step": step, **{str(k): float(v) for k, v in metrics.items()}}


def _report(bar: Any, state: TrainState, config: TrainConfig) -> None:
    recent = state.losses[-config.log_every :]
    running = sum(recent) / len(recent)
    bar.update(1)
    bar.set_postfix(loss=f"{running:.4f}", refresh=False)
    if state.step % config.log_every == 0 and distributed.is_main():
        logger.info("step %d: loss %.6f (mean of the last %d steps)", state.step, running, len(recent))


def _save_on_main(
    folder: Path, model: CPTModel, optimizer: torch.optim.Optimizer, state: TrainState, config: TrainConfig,
    num_samples: int, data: dict[str, str] | None,
) -> None:
    """Rank 0 writes the checkpoint (every rank holds the same state); the others wait for it."""
    if distributed.is_main():
        save_checkpoint(folder, model, optimizer, state, config, num_samples=num_samples, fingerprint=data)
    distributed.barrier()


def _check_samples_fit(model: CPTModel, dataset: Sequence[Any]) -> None:
    """Refuses, before the first step, a sample that would not fit after the context in the base
    model's positions, naming the longest (the forward pass would refuse it only when its batch
    comes)."""
    samples = getattr(dataset, "samples", None)  # a CPTDataset: rendered once, lengths at hand
    if not isinstance(samples, Sequence) or not samples:
        return
    lengths = [len(getattr(sample, "input_ids", ())) for sample in samples]
    longest = max(range(len(lengths)), key=lengths.__getitem__)  # the first of the longest
    what = f"training sample {longest}"
    _compat.check_positions(model.base_model.config, model.num_virtual_tokens, lengths[longest], what)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too




# ---------------------------------------------------------------------- validation


def _check_arguments(
    model: Any, dataset: Any, config: Any, collator: Any, eval_fn: Any, checkpoint_dir: Any, resume_from: Any
) -> None:
    """Refuses an argument of `train` of the wrong type before anything runs."""
    check_instance(model, CPTModel, "model")
    if not isinstance(dataset, Sized) or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"dataset must be indexable samples with a length, got {type(dataset).__name__}")
    check_instance(config, TrainConfig, "config")
    for name, function in (("collator", collator), ("eval_fn", eval_fn)):
        if not callable(function) and not (name == "eval_fn" and function is None):
            raise ValueError(f"{name} must be callable, got {type(function).__name__}")
    for name, path in (("checkpoint_dir", checkpoint_dir), ("resume_from", resume_from)):
        if path is not None:
            check_path(path, name)


def _check_number(name: str, value: Any, *, minimum: float, inclusive: bool, maximum: float | None = None) -> None:
    ok = is_finite(value) and (value >= minimum if inclusive else value > minimum)
    if not ok or (maximum is not None and value > maximum):
        if maximum is not None:
            bound = f"in {'[' if inclusive else '('}{minimum}, {maximum!r}]"
        else:
            bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {show(value)}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
