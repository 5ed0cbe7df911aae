"""`CPTModel`: a frozen Hugging Face causal LM with a trainable CPT context in front of it.

Context-aware Prompt Tuning (Blau et al., arXiv 2410.17222) puts K labelled examples in front of
the model, like in-context learning, and refines the context's embeddings by projected gradient
descent on a loss over the labels. `CPTModel` wires the rooms together: `cpt.context` holds the
parameters and the projection, `cpt.plan` decides which path a call takes, `cpt.passes` runs the
base model, `cpt.loss` computes the loss and `cpt.adapter` reads and writes adapter folders.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers.utils import ModelOutput

from cpt import _compat, generation, hub, loss, passes, plan, recompute
from cpt._fields import check_bool, check_path, show
from cpt.adapter import read_adapter, save_adapter
from cpt.config import AdapterFormat, CPTConfig
from cpt.context import Context
from cpt.inputs import check_base_model, check_batch, check_token_ids
from cpt.passes import ContextCache
from cpt.warning import CPTWarning

__all__ = ["CPTModel", "CPTOutput", "ContextCache", "load_adapter"]


@dataclass
class CPTOutput(ModelOutput):
    """What `CPTModel.forward` returns (a `transformers` ModelOutput, so `Trainer` can read it).

    Attributes:
        loss: scalar CPT loss when ``labels`` were given, else None.
        logits: (B, S, V) logits over the sample's own positions when no ``labels`` were given,
            else None (training never builds them).
        num_targets: number of label positions the loss averages over (None without labels).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_targets: int | None = None


Count = loss.Count | None
Tensor = torch.Tensor | None


class _Conveniences(nn.Module):
    """What PEFT users reach for on a `CPTModel`: its device and dtype, the base model, a parameter
    count, generation with the trained context, and uploading the adapter."""

    device = property(lambda self: passes.input_embeddings(self.base_model).weight.device, doc="Where inputs go.")
    dtype = property(lambda self: passes.input_embeddings(self.base_model).weight.dtype,
                     doc="The base model's parameter dtype; ``base`` and ``delta`` stay float32.")

    def get_base_model(self) -> nn.Module:
        """The wrapped (frozen) base model."""
        return self.base_model

    def print_trainable_parameters(self) -> None:
        """Prints the trainable (``delta``) and total parameter counts, as PEFT models do."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def generate(self, tokenizer, texts, **kwargs):  # type: ignore[no-untyped-def]
        """`cpt.generation.generate` (which uses the model's own template unless ``template`` is given)."""
        return generation.generate(self, tokenizer, texts, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:  # type: ignore[no-untyped-def]
        """Uploads the adapter and a model card to ``repo_id`` (`cpt.hub.push_to_hub`); returns the URL."""
        return hub.push_to_hub(self, repo_id, **kwargs)


class _TrainerSupport(nn.Module):
    """What `transformers.Trainer` (and data parallelism, `cpt.distributed`) needs of a `CPTModel`.

    `CPTModel.forward` takes ``num_items_in_batch``, the number of loss terms in the whole batch
    this one is part of (all micro-batches of an optimizer step, on all ranks), as `Trainer`
    passes it: the loss is then this batch's weighted sum over it, so the gradients summed over
    micro-batches and ranks are those of the whole batch (None: this batch's own count). And
    ``shift_labels``, this batch's loss targets (`loss_targets`), which
    `cpt.callback.TrainerCollator` adds so that `Trainer` counts ``num_items_in_batch`` as CPT
    does; they are only checked against the batch (ValueError if their count differs).
    """

    accepts_loss_kwargs = True  # Trainer then leaves the loss's normalisation to the model

    def loss_targets(self, labels: torch.Tensor, input_type_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Mc + S) the ids the loss predicts per row, on the CPU (`cpt.loss.loss_targets`)."""
        return loss.loss_targets(self.context, labels, input_type_mask)

    def state_dict(self, *, destination=None, prefix="", keep_vars=False):  # type: ignore[no-untyped-def, override]
        """The adapter's ``base`` and ``delta`` only, never the base model's weights (so
        `transformers.Trainer` saves the adapter alone, tied embeddings or not)."""
        return _adapter_state(self, destination, prefix, keep_vars)

    def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[no-untyped-def, override]
        """Copies ``base`` and ``delta`` from a `state_dict` (RuntimeError on wrong keys or shapes)."""
        return _load_adapter_state(self, state_dict, strict)


class _Inference(nn.Module):
    """The inference API that `cpt.infer` and `cpt.generation` use: the facts they check queries
    against, and the passes after the cached context (`cpt.passes` runs the base model)."""

    vocab_size = property(lambda self: int(passes.input_embeddings(self.base_model).weight.shape[0]),
                          doc="V, the rows of the base model's input embeddings.")

    def check_fits(self, num_tokens: int, what: str = "samples") -> None:
        """Refuses ``what`` of ``num_tokens`` tokens after the context where the model has fewer positions."""
        _compat.check_positions(self.base_model.config, self.num_virtual_tokens, num_tokens, what)

    def query_pass(
        self, cache: ContextCache, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, _compat.KV, torch.Tensor]:
        """b right-padded queries (b, S) after the cached context.

        Returns:
            The (b, K, V) logits at the query positions ``keep``, the per-layer (keys, values) of
            ``[context ; queries]`` (each (b, heads, N + S, dim)), and their (b, N + S) mask.
        """
        mask = torch.cat([self.context_mask(input_ids.shape[0]), attention_mask], dim=1)  # (b, N + S)
        logits, states = passes.query_pass(self.base_model, cache, input_ids, mask, keep)
        return logits, states, mask

    def continuation_pass(
        self, prefix: _compat.KV, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """(R, K, V) logits at ``keep`` of R continuations (R, C) after per-row prefixes
        (`cpt.passes.continuation_pass`)."""
        return passes.continuation_pass(self.base_model, prefix, input_ids, mask, positions, keep)

    def context_mask(self, batch_size: int) -> torch.Tensor:
        """(batch_size, N) the attention mask of the context's rows."""
        return self.context.mask.expand(batch_size, -1)


class CPTModel(_TrainerSupport, _Conveniences, _Inference):
    """Wraps any `transformers` causal LM with a CPT context.

    The base model is frozen. The context's embeddings are ``base + delta`` (`cpt.context`).

    Args:
        base_model: a `transformers` causal LM (``AutoModelForCausalLM``); frozen in place.
        config: the context.
        context_sharing: ``"auto"`` runs the context once per batch when the batch has more than
            one sample and labels; ``"on"`` and ``"off"`` force the choice (`cpt.plan`).
        compile_projection: fuse the projection with ``torch.compile``; ``"auto"`` compiles on
            CUDA only (`cpt.plan.compiles_projection`).
        activation_checkpointing: keep only each layer's input during the forward pass and
            recompute the rest in the backward pass (`cpt.recompute`): long contexts fit in
            far less memory, for one more forward pass. Works with the shared context.
        shared_attention: with a shared context, let the samples attend to one copy of it
            (`cpt.attention`) instead of B copies in a `transformers` cache: less memory, and
            faster at long contexts. ``"auto"`` decides by B x N (`cpt.plan.ONE_COPY_MIN_ROWS`).

    Options take ``"auto"``, ``"on"``, ``"off"`` (`cpt.plan.choice`); two are also attributes.

    Raises:
        ValueError: if ``base_model`` is not a loaded causal LM (`cpt.inputs.check_base_model`),
            the context does not fit it (ids, positions) or an option is not one of its choices.
    """

    context_sharing = plan.Option()
    shared_attention = plan.Option()

    def __init__(
        self,
        base_model: nn.Module,
        config: CPTConfig,
        *,
        context_sharing: plan.Choice = "auto",
        compile_projection: plan.Choice = "auto",
        activation_checkpointing: bool = False,
        shared_attention: plan.Choice = "auto",
    ) -> None:
        super().__init__()
        _check_arguments(config, activation_checkpointing)
        embeddings = check_base_model(base_model)
        self.options = plan.Options(context_sharing=context_sharing, shared_attention=shared_attention)
        self.context = Context(config, embeddings, compile_projection)
        _compat.check_positions(base_model.config, self.context.num_tokens)
        self.base_model = base_model
        self.base_model.requires_grad_(False)
        if activation_checkpointing:
            recompute.enable(base_model)
        self._context_cache: ContextCache | None = None  # see context_cache()
        self._warned_fallback = False
        self.task: dict | None = None  # template and label set, saved with the adapter (cpt.workflow)

    # ------------------------------------------------------------------ parameters

    # The context's pieces, read through the model (adapter I/O, optimizers, invariants).
    config = property(lambda self: self.context.config, doc="The context's `CPTConfig`.")
    num_virtual_tokens = property(lambda self: self.context.num_tokens, doc="N, the context's length.")
    hidden_size = property(lambda self: self.context.hidden_size, doc="d, the embedding size.")
    base = property(lambda self: self.context.base, doc="(N, d) float32 embeddings of the context's ids.")
    delta = property(lambda self: self.context.delta, doc="(N, d) float32 trainable offsets, row i in ball i.")
    epsilon = property(lambda self: self.context.epsilon, doc="(N,) float32 radius of each row's ball.")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should update: ``[delta]``."""
        return [self.delta]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights: ``base`` and ``delta``, each (N, d) float32, detached."""
        return {"base": self.base.detach(), "delta": self.delta.detach()}

    def context_embeddings(self) -> torch.Tensor:
        """(N, d) float32 context embeddings: frozen ``base`` + projected ``delta``."""
        return self.context.values()

    def is_projected(self, rtol: float = 1e-5) -> bool:
        """Whether every row of ``delta`` is inside its ball (up to float rounding, ``rtol``)."""
        return self.context.is_projected(rtol)

    def project_(self) -> None:
        """Puts every row of ``delta`` back into its L2 ball; call after each optimizer step."""
        self.context.project_()

    def train(self, mode: bool = True) -> CPTModel:
        """Sets the training mode of the module; the frozen base model always stays in eval mode
        (no dropout), also when `transformers.Trainer` calls ``model.train()`` each step."""
        super().train(mode)
        self.base_model.eval()
        return self

    # ------------------------------------------------------------------ forward

    def execution_plan(self, purpose: plan.Purpose, batch_size: int, seq_len: int, **options: object) -> plan.Plan:
        """The execution plan of a call (`cpt.plan.resolve`), with this model's options updated
        by ``options`` (``cuda_graphs``, ``context_cache``)."""
        chosen = replace(self.options, **options) if options else self.options
        facts = passes.facts(self.base_model, self.delta.device)
        return plan.resolve(purpose, chosen, facts, num_context=self.num_virtual_tokens, batch_size=batch_size,
                            seq_len=seq_len, grad=torch.is_grad_enabled())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        input_type_mask: torch.Tensor | None = None,
        *,
        num_items_in_batch: Count = None,
        shift_labels: Tensor = None,
    ) -> CPTOutput:
        """Runs the model over ``[context ; sample]``: plan, passes, loss. The batch may be on the
        CPU (the shared path reads its targets there, not waiting for the GPU) or the device.

        Args:
            input_ids: (B, S) token ids of the samples, right-padded.
            attention_mask: (B, S) 1 for real tokens, 0 for padding; None means all real.
            labels: (B, S) target ids (usually ``input_ids``); -100 marks ignored positions.
                Given, the CPT loss is returned.
            input_type_mask: (B, S) type codes 0..4 of the samples; None treats every sample
                token as a label, as PEFT does. Never modified.
            num_items_in_batch: the loss terms of the whole batch this one belongs to (every
                micro-batch and rank, as `transformers.Trainer` passes it); the loss is this
                batch's sum divided by it. None: this batch's own count.
            shift_labels: this batch's loss targets (`loss_targets`), checked against it.

        Returns:
            `CPTOutput`: ``loss`` with labels; else ``logits`` (B, S, V) of the sample positions.

        Raises:
            ValueError: on a batch `cpt.inputs.check_batch` refuses, one without any label token,
                or context and samples longer than the model's positions.
        """
        check_batch(input_ids, attention_mask, labels, input_type_mask)
        _compat.check_positions(self.base_model.config, self.num_virtual_tokens, int(input_ids.shape[1]))
        check_token_ids(input_ids, labels, int(self.base_model.get_input_embeddings().weight.shape[0]))
        if labels is None:
            return CPTOutput(logits=self.sample_logits(input_ids, attention_mask))
        how = self.execution_plan("loss", *input_ids.shape)
        if how.why_plain in (plan.Why.HF_CHECKPOINTING, plan.Why.SLIDING_WINDOW) and not self._warned_fallback:
            warnings.warn(
                f"context sharing is off: {how.why_plain.value}; using the plain path", CPTWarning, stacklevel=2
            )
            self._warned_fallback = True
        batch = (input_ids, attention_mask, labels, input_type_mask)
        value, count = loss.batch_loss(self.base_model, self.context, how, batch,
                                       num_items_in_batch=num_items_in_batch, shift_labels=shift_labels)
        return CPTOutput(loss=value, num_targets=count)

    # ------------------------------------------------------------------ inference

    def context_cache(self) -> ContextCache:
        """The context's KV cache, built on first use and kept while the adapter is unchanged
        (rebuilt after a step, a projection, a load, or a move to another device or dtype)."""
        if self._context_cache is None or self._context_cache.source != self.context_key():
            self._context_cache = self.build_context_cache()
        return self._context_cache

    def context_key(self) -> tuple:
        """What the context's KV cache depends on: this model, its adapter's tensors, their dtype."""
        delta, base = self.delta, self.base
        dtype = passes.input_embeddings(self.base_model).weight.dtype
        return (id(self), delta._version, delta.data_ptr(), base._version, base.data_ptr(), dtype)

    def build_context_cache(self) -> ContextCache:
        """Runs the (constant, trained) context once and keeps its KV cache for inference.

        Raises:
            ValueError: where a cache cannot stand in for the context (a sliding window).
        """
        how = self.execution_plan("infer", 1, 1, context_cache="on")
        cache = passes.build_context_cache(self.base_model, self.context, causal=how.causal_context)
        return replace(cache, source=self.context_key())

    def sample_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        context_cache: ContextCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the next token at the sample's positions, given the context.

        Args:
            input_ids: (B, S) right-padded sample ids.
            attention_mask: (B, S) or None.
            context_cache: from `build_context_cache`; skips re-running the context.
            positions: (P,) sorted sample positions to compute logits at; None for all S.

        Returns:
            (B, S, V) logits, or (B, P, V) at ``positions``; position s scores the token at s + 1.
        """
        embeds = passes.embed(self.base_model, input_ids)  # (B, S, d)
        positions = torch.arange(input_ids.shape[1]) if positions is None else positions
        positions = positions.to(device=embeds.device, dtype=torch.long)
        if context_cache is None:
            keep = positions + self.num_virtual_tokens
            return passes.plain(self.base_model, self.context, embeds, attention_mask, keep)
        passes.check_context_cache(context_cache, self.num_virtual_tokens, self.context_key())
        how = self.execution_plan("infer", *input_ids.shape)
        states = context_cache.tensors
        return passes.against_context(
            self.base_model, self.context, embeds, attention_mask, states, positions, one_copy=how.one_copy
        )

    # ------------------------------------------------------------------ files

    def save_pretrained(self, path: str | Path, format: AdapterFormat = "cpt") -> Path:
        """Writes the adapter to the folder ``path`` (projecting first if a row is outside its
        ball), replacing any adapter there as a whole; see `cpt.adapter`."""
        if not self.is_projected():  # projecting a projected delta again moves rows by an ulp
            self.project_()
        return save_adapter(self, path, format=format)

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, path: str | Path, *, revision: str | None = None, **kwargs
    ) -> CPTModel:
        """Loads an adapter in either layout onto ``base_model``, every file checked against it
        (`cpt.adapter.read_adapter`). ``path`` is a folder or a hub name (``org/name``, at
        ``revision``; `cpt.hub.resolve_adapter`: the local Hugging Face cache, else downloaded).
        ``kwargs`` are `CPTModel`'s options.

        Raises:
            ValueError: on an argument of the wrong type or an unknown option (before anything
                is read), and on an adapter that does not load (see `cpt.adapter.read_adapter`).
        """
        _check_location(path, revision, kwargs)
        embeddings = check_base_model(base_model)
        vocab_size, hidden_size = (int(n) for n in embeddings.weight.shape)
        embed = lambda ids: embeddings(ids.to(embeddings.weight.device))  # noqa: E731 (as base is made)
        files = read_adapter(hub.resolve_adapter(path, revision=revision), hidden_size=hidden_size,
                             vocab_size=vocab_size, embed=embed)
        model = cls(base_model, files.config, **kwargs)
        model.task = files.task
        with torch.no_grad():
            model.base.copy_(files.base)
            model.delta.copy_(files.delta)
        return model


def load_adapter(base_model: nn.Module, path: str | Path, **model_kwargs: object) -> CPTModel:
    """Loads an adapter folder of either layout onto ``base_model``: `CPTModel.from_pretrained`.

    Args:
        base_model: the causal LM the adapter was trained on (same hidden size, vocabulary and
            embeddings).
        path: the folder, or a hub name.
        **model_kwargs: `CPTModel`'s options (``context_sharing``, ``compile_projection``...).

    Returns:
        A `CPTModel` whose ``context_embeddings()`` equal the saved ones exactly.

    Raises:
        ValueError: naming what is missing, malformed, or does not match the model.
    """
    return CPTModel.from_pretrained(base_model, path, **model_kwargs)


def _check_arguments(config: object, activation_checkpointing: object) -> None:
    if not isinstance(config, CPTConfig):
        raise ValueError(f"config must be a CPTConfig, got {type(config).__name__}")
    check_bool(activation_checkpointing, "activation_checkpointing")


def _check_location(path: object, revision: object, options: dict[str, object]) -> None:
    check_path(path, "path")
    if revision is not None and not isinstance(revision, str):
        raise ValueError(f"revision must be a string or None, got {show(revision)}")
    check_options(options)


def check_options(options: dict[str, object]) -> None:
    """Checks that ``options`` names only `CPTModel`'s keyword options (their values are checked
    when the model is made).

    Raises:
        ValueError: naming the first unknown option and listing the known ones.
    """
    known = [p.name for p in inspect.signature(CPTModel.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted((key for key in options if key not in known), key=repr)
    if unknown:
        raise ValueError(f"unknown CPTModel option {show(unknown[0])}; the options are {known}")


def _adapter_state(model: CPTModel, destination, prefix: str, keep_vars: bool):  # type: ignore[no-untyped-def]
    destination = {} if destination is None else destination
    for name, tensor in (("base", model.base), ("delta", model.delta)):
        destination[prefix + name] = tensor if keep_vars else tensor.detach()
    return destination


def _load_adapter_state(model: CPTModel, state_dict, strict: bool):  # type: ignore[no-untyped-def]
    from torch.nn.modules.module import _IncompatibleKeys

    names = ("base", "delta")
    missing = [name for name in names if name not in state_dict]
    unexpected = [key for key in state_dict if key not in names]
    if strict and (missing or unexpected):
        raise RuntimeError(f"CPTModel state_dict: missing keys {missing}, unexpected keys {unexpected}")
    with torch.no_grad():
        for name in names:
            if name in state_dict:
                target, value = getattr(model, name), state_dict[name]
                if tuple(value.shape) != tuple(target.shape):
                    raise RuntimeError(
                        f"CPTModel state_dict: {name} has shape {tuple(value.shape)}, "
                        f"the model's is {tuple(target.shape)}"
                    )
                target.copy_(value)
    return _IncompatibleKeys(missing, unexpected)

