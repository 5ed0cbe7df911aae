"""Training and inference passes replayed from CUDA graphs.

A small model at a short context is bound by the host, not the GPU: a shared-context step issues
a few thousand kernels (two passes over the model and their backward), each launched from Python
through `transformers`, and the GPU idles between them. A CUDA graph records the kernels of a
pass once and replays them all with one launch. Where graphs run is decided by `cpt.plan`.

- `GraphedLoss` replays the shared-context loss with its backward (`cpt.loss.shared_total`)
  and adds the gradient to ``delta.grad``, as ``loss.backward()`` would. What depends on the
  batch's values (which positions are targets, their weights, how many, what the sum is divided
  by) is worked out on the CPU first (`cpt.loss.plan_targets`, `cpt.loss.divisor`), so the graph
  never reads a value back from the GPU.
  `cpt.train.train` uses it on CUDA by default (``TrainConfig.cuda_graphs``).
- `GraphedLogits` replays `CPTModel.sample_logits` against a context's KV cache: queries scored
  against a trained context.

One graph is captured per input shape (batches are padded to a few shapes) and kept, the least
recently used dropped beyond `MAX_GRAPHS`; all share one memory pool. A capture costs the call
that makes it nothing extra but the capture itself: the eager warm-up pass it needs gives that
call's result, and the first replay is checked against it. A capture that fails, or a replay that
does not reproduce the eager pass, turns graphs off for that object with one warning, and eager
passes are used from then on.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cpt import loss
from cpt.config import IGNORE_INDEX, TokenRole
from cpt.data import right_pad
from cpt.loss import Targets, plan_targets
from cpt.passes import ContextCache, input_embeddings, to_device
from cpt.plan import Plan, Purpose
from cpt.warning import CPTWarning

if TYPE_CHECKING:
    from cpt.model import CPTModel

MAX_GRAPHS = 8
"""Input shapes kept captured at once per object; the least recently used is dropped beyond it."""

SEQ_BUCKET = 8
"""Batches are padded on the right to a multiple of this many tokens, so that batches of nearby
lengths share a graph (padding is masked and scores nothing)."""

TARGET_BUCKET = 8
"""Kept sample positions of a training batch are padded to a multiple of this (padding terms
weigh 0), for the same reason."""

CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
"""How far (in norm, relative) each output of a replay may be from the eager pass it was captured
from, by the dtype the model computes in. The two can use different attention kernels (under
capture, `transformers` 5.17 writes the causal mask out instead of asking for a causal kernel),
which round differently in half precision, by far less than the bound; a stale or misplaced
input is off by the order of the values themselves."""

SIGHTINGS_KEPT = 1024
"""Shapes counted towards ``capture_after`` at most; the count starts over beyond it."""

Tensor = torch.Tensor | None
Tensors = dict[str, Tensor]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Tensors  # static buffers the values are copied into before each replay
    outputs: dict[str, torch.Tensor]  # rewritten by each replay
    keep_alive: Any = None  # what the graph reads by address besides its inputs (a context cache)


class _Replayer:
    """Graphs by key: captured on a key's ``capture_after``-th call (and checked against the
    eager pass), replayed after; eager passes for good once a capture failed or mismatched."""

    def __init__(
        self, what: str, device: torch.device, max_graphs: int, tolerance: float, capture_after: int = 1
    ) -> None:
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an integer >= 1, got {max_graphs!r}")
        if isinstance(capture_after, bool) or not isinstance(capture_after, int) or capture_after < 1:
            raise ValueError(f"capture_after must be an integer >= 1, got {capture_after!r}")
        self.what = what
        self.tolerance = tolerance
        self.capture_after = capture_after
        self.sightings: dict[Hashable, int] = {}  # calls per shape not captured yet
        self.device = device
        self.max_graphs = max_graphs
        self.enabled = True
        self.captures = 0
        self.graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        # One pool for every graph: they replay one at a time and their outputs are read right
        # after, so they share scratch memory (one pass's activations, not one per shape).
        self.pool = torch.cuda.graph_pool_handle()

    def run(
        self,
        key: Hashable,
        inputs: Tensors,
        fn: Callable[[Tensors], dict[str, torch.Tensor]],
        keep_alive: Any = None,
    ) -> dict[str, torch.Tensor]:
        """``fn(inputs)``, from the graph of ``key`` (captured now if new) or eagerly once graphs
        are off. The outputs are only valid until the next call."""
        if not self.enabled:
            return fn(_to_device(inputs, self.device))
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            _load(entry.inputs, inputs)
            entry.graph.replay()
            return entry.outputs
        self.sightings[key] = self.sightings.get(key, 0) + 1
        if self.sightings[key] < self.capture_after:  # a shape seen once may never come back
            if len(self.sightings) > SIGHTINGS_KEPT:
                self.sightings.clear()
            return fn(_to_device(inputs, self.device))
        self.sightings.pop(key)
        try:
            entry, eager = self._capture(inputs, fn, keep_alive)
        except Exception as error:  # noqa: BLE001 - whatever broke the capture, eager passes work
            self.disable(f"capture failed ({type(error).__name__}: {error})")
            return fn(_to_device(inputs, self.device))
        mismatch = _mismatch(entry.outputs, eager, self.tolerance)
        if mismatch is not None:
            self.disable(f"a replay does not match the eager pass ({mismatch})")
            return eager
        self.graphs[key] = entry
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return eager

    def disable(self, reason: str) -> None:
        self.enabled = False
        self.graphs.clear()
        warnings.warn(
            f"CUDA graphs are off for this {self.what}: {reason}; using eager passes", CPTWarning, stacklevel=4
        )

    def _capture(
        self, inputs: Tensors, fn: Callable[[Tensors], dict[str, torch.Tensor]], keep_alive: Any
    ) -> tuple[_Graph, dict[str, torch.Tensor]]:
        static: Tensors = {
            name: None if value is None else torch.empty(value.shape, dtype=value.dtype, device=self.device)
            for name, value in inputs.items()
        }
        _load(static, inputs)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up: kernels choose their algorithms and workspaces
            eager = {name: value.clone() for name, value in fn(static).items()}
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn(static)
        graph.replay()
        self.captures += 1
        return _Graph(graph, static, outputs, keep_alive), eager


class _Graphed:
    """What `GraphedLoss` and `GraphedLogits` share: the model check and the replayer's state."""

    def __init__(
        self,
        what: str,
        model: CPTModel,
        max_graphs: int,
        *,
        purpose: Purpose,
        autocast: bool = False,
        capture_after: int = 1,
    ) -> None:
        if not callable(getattr(model, "execution_plan", None)):  # a CPTModel, without importing it
            raise ValueError(f"model must be a CPTModel, got {type(model).__name__}")
        self.purpose = purpose
        self.model = model
        self._plans: dict[Hashable, Plan] = {}
        self.plan(1, 1)  # raises where graphs cannot run
        tolerance = _tolerance(model, autocast)
        self._replayer = _Replayer(what, model.delta.device, max_graphs, tolerance, capture_after)

    def plan(self, batch_size: int, seq_len: int) -> Plan:
        """The model's plan for a call of this shape, with graphs (`cpt.plan.resolve`); kept per
        shape and options, so a replay does not pay for reading the model's facts again.

        Raises:
            ValueError: where graphs cannot run.
        """
        key = (batch_size, seq_len, torch.is_grad_enabled(), self.model.options)
        if key not in self._plans:
            self._plans[key] = self.model.execution_plan(self.purpose, batch_size, seq_len, cuda_graphs="on")
        return self._plans[key]

    @property
    def enabled(self) -> bool:
        """False once a capture failed or did not match (every call is eager from then on)."""
        return self._replayer.enabled

    @property
    def captures(self) -> int:
        """Graphs captured so far."""
        return self._replayer.captures


class GraphedLoss(_Graphed):
    """Forward and backward of the shared-context CPT loss, replayed from CUDA graphs.

    Call it in place of ``model(**batch).loss.backward()``: it adds the gradient of the loss
    (times ``scale``) to ``model.delta.grad`` and returns the loss. Batches are best given on the
    CPU, where a collator makes them: the loss plan is read there, and the values reach the
    graph's buffers without the host waiting for the GPU.

    Args:
        model: a `CPTModel` on a CUDA device whose context can be shared (`cpt.plan`).
        autocast: run the passes under bf16 autocast (without autocast's weight cache, which a
            graph cannot keep).
        max_graphs: batch shapes kept captured at once.

    Raises:
        ValueError: if the model is not on a CUDA device or cannot share its context.
    """

    def __init__(self, model: CPTModel, *, autocast: bool = False, max_graphs: int = MAX_GRAPHS) -> None:
        super().__init__("loss", model, max_graphs, purpose="train", autocast=autocast)
        self.autocast = autocast

    def __call__(self, input_ids: torch.Tensor, attention_mask: Tensor = None, labels: Tensor = None,
                 input_type_mask: Tensor = None, *, scale: float = 1.0) -> tuple[torch.Tensor, int]:
        """Adds ``scale`` times the gradient of the batch's loss to ``delta.grad``.

        Args:
            input_ids, attention_mask, labels, input_type_mask: a batch, as for `CPTModel.forward`
                (``labels`` None means ``input_ids``).
            scale: factor on the gradient (the returned loss is not scaled).

        Returns:
            ``(loss, num_targets)``: the 0-dim float32 loss on the model's device (detached) and
            the number of target positions it averages over.
        """
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "input_type_mask": input_type_mask}
        input_ids, targets = self.prepare(batch)
        return self.backward(input_ids, targets, scale=scale), targets.count

    def prepare(self, batch: Mapping[str, Tensor]) -> tuple[torch.Tensor, Targets]:
        """The batch (``input_ids`` and, as for `CPTModel.forward`, ``attention_mask``,
        ``labels`` and ``input_type_mask``) as the graphs take it: padded on the right to a
        multiple of `SEQ_BUCKET` tokens (`pad_batch`: the loss is unchanged), and its targets
        (`cpt.loss.plan_targets`, padded to `TARGET_BUCKET`), whose ``count`` is known before
        anything runs on the GPU.

        Returns:
            ``(input_ids, targets)`` for `backward`.
        """
        input_ids, labels = batch["input_ids"], batch.get("labels")
        labels = input_ids if labels is None else labels
        input_ids, attention_mask, labels, input_type_mask = pad_batch(
            input_ids, batch.get("attention_mask"), labels, batch.get("input_type_mask"), multiple=SEQ_BUCKET
        )
        context = self.model.context
        targets = plan_targets(context, labels, input_type_mask, attention_mask, pad_targets_to=TARGET_BUCKET)
        return input_ids, targets

    def backward(
        self, input_ids: torch.Tensor, targets: Targets, *, scale: float = 1.0, num_items_in_batch: int | None = None
    ) -> torch.Tensor:
        """Runs the pass for ``targets`` (from `prepare`); adds ``scale`` times the gradient to
        ``delta.grad`` and returns the detached loss, the weighted sum over
        ``cpt.loss.divisor(targets.count, num_items_in_batch)``."""
        model = self.model
        delta = model.delta
        how = self.plan(*input_ids.shape)
        divisor = torch.tensor(float(loss.divisor(targets.count, num_items_in_batch)))  # a value: no new graph
        inputs: Tensors = {"input_ids": input_ids, "divisor": divisor, **targets.tensors()}
        key = (
            tuple(input_ids.shape),
            targets.keep.numel(),
            targets.attention_mask is not None,
            delta.data_ptr(),
            model.base.data_ptr(),
            how,  # which attention the pass records
        )
        stash, delta.grad = delta.grad, None
        try:
            outputs = self._replayer.run(key, inputs, functools.partial(self._pass, how))
        finally:
            delta.grad = stash
        _accumulate(delta, outputs["grad"], scale)
        return outputs["loss"].clone()

    def _pass(self, how: Plan, inputs: Tensors) -> dict[str, torch.Tensor]:
        model = self.model
        targets = Targets.from_tensors(inputs, count=0)
        model.delta.grad = None
        autocast = contextlib.nullcontext()
        if self.autocast:
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        with autocast:
            total = loss.shared_total(model.base_model, model.context, inputs["input_ids"], targets, how)
            value = total / inputs["divisor"]
        value.backward()
        grad, model.delta.grad = model.delta.grad, None
        if grad is None:
            raise RuntimeError("no gradient reached delta")
        return {"loss": value.detach(), "grad": grad}


class GraphedLogits(_Graphed):
    """`CPTModel.sample_logits` against a context cache, replayed from CUDA graphs.

    Args:
        model: a `CPTModel` on a CUDA device.
        context_cache: the context's KV cache; ``model.context_cache()`` (built once, kept while
            the adapter is unchanged) if None, fetched again on every call.
        max_graphs: input shapes kept captured at once.
        capture_after: capture a shape on its this-many-th call (the calls before run eagerly),
            so that shapes that never come back cost no capture.

    Raises:
        ValueError: if the model is not on a CUDA device or its context cannot be cached.
    """

    def __init__(
        self,
        model: CPTModel,
        context_cache: ContextCache | None = None,
        *,
        max_graphs: int = MAX_GRAPHS,
        capture_after: int = 1,
    ) -> None:
        super().__init__("inference", model, max_graphs, purpose="infer", capture_after=capture_after)
        self.context_cache = context_cache

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        *,
        context_cache: ContextCache | None = None,
    ) -> torch.Tensor:
        """``model.sample_logits(input_ids, attention_mask, context_cache=..., positions=positions)``.

        Args:
            context_cache: this call's context cache; the one given at construction (or the
                model's own) if None.

        Returns:
            (B, S, V) logits, or (B, P, V) at ``positions``: a tensor of its own.
        """
        cache = context_cache or self.context_cache or self.model.context_cache()
        if positions is None:
            positions = torch.arange(input_ids.shape[1])
        inputs: Tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions}
        key = (
            tuple(input_ids.shape),
            attention_mask is not None,
            positions.numel(),
            id(cache),  # the cache is kept alive with the graph, so its id is not reused meanwhile
            torch.is_autocast_enabled("cuda"),
            self.plan(*input_ids.shape),  # which attention the pass records
        )

        def run(x: Tensors) -> dict[str, torch.Tensor]:
            logits = self.model.sample_logits(
                x["input_ids"], x["attention_mask"], context_cache=cache, positions=x["positions"]
            )
            return {"logits": logits}

        return self._replayer.run(key, inputs, run, keep_alive=cache)["logits"].clone()


def pad_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    input_type_mask: torch.Tensor | None,
    *,
    multiple: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Right-pads a batch to a multiple of ``multiple`` tokens: padding is masked out, has type
    code 0 and label -100, so no real position sees it and the loss does not change.

    Returns:
        ``(input_ids, attention_mask, labels, input_type_mask)``; the mask is made (ones over
        the real tokens) when padding is added to a batch that had none.
    """
    if input_ids.shape[1] % multiple == 0:
        return input_ids, attention_mask, labels, input_type_mask
    input_ids, real = right_pad(input_ids, 0, multiple)  # (B, S) each
    return (
        input_ids,
        real if attention_mask is None else right_pad(attention_mask, 0, multiple)[0],
        right_pad(labels, IGNORE_INDEX, multiple)[0],
        None if input_type_mask is None else right_pad(input_type_mask, int(TokenRole.SEPARATOR), multiple)[0],
    )


def _load(static: Tensors, values: Tensors) -> None:
    """Copies input values into a graph's buffers (from the CPU through pinned memory)."""
    for name, value in values.items():
        if value is None:
            continue
        if value.device.type == "cpu":
            value = value.pin_memory()
        static[name].copy_(value, non_blocking=True)  # type: ignore[union-attr]


def _to_device(values: Tensors, device: torch.device) -> Tensors:
    return {name: None if value is None else to_device(value, device) for name, value in values.items()}


def _accumulate(param: torch.nn.Parameter, grad: torch.Tensor, scale: float) -> None:
    if param.grad is None:
        param.grad = grad * scale
    else:
        param.grad.add_(grad, alpha=scale)


def _mismatch(outputs: dict[str, torch.Tensor], eager: dict[str, torch.Tensor], tolerance: float) -> str | None:
    """Which output of a replay differs from the eager pass's (None if all agree)."""
    for name, expected in eager.items():
        expected = expected.float()
        difference = torch.linalg.vector_norm(outputs[name].float() - expected)
        floor = torch.finfo(torch.float32).tiny  # an all-zero output divides by this, not by 0
        norm = torch.linalg.vector_norm(expected).clamp_min(floor)
        error = (difference / norm).item()
        if not error <= tolerance:  # also catches NaN
            return f"{name} differs by {error:.3g} of its norm (bound {tolerance:.3g})"
    return None


def _tolerance(model: CPTModel, autocast: bool = False) -> float:
    dtype = torch.bfloat16 if autocast else input_embeddings(model.base_model).weight.dtype
    return CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE[torch.bfloat16])
