"""`CPTModel`: a frozen Hugging Face causal LM with a trainable CPT context in front of it.

Context-aware Prompt Tuning (Blau et al., arXiv 2410.17222) puts K labelled examples in front of
the model, like in-context learning, and refines the context's embeddings by projected gradient
descent on a loss over the labels. This module owns the forward pass; the loss lives in
`cpt.loss`, the projection in `cpt.projection`, adapter files in `cpt.adapter`.

Two exact formulations of the same function are used (SPEC §5):

- *plain*: the model runs over ``[context ; sample]`` for each of the B samples, as PEFT does;
- *shared context*: causal attention means the context's hidden states do not depend on the
  sample, so the context runs once (batch 1) into a KV cache that keeps its gradient, and the B
  samples run against it. The context's loss terms are computed once and weighted by B. Where
  `cpt.attention` supports the model, the samples attend to that one copy of the context rather
  than to B copies in a `transformers` cache.

In both, vocabulary logits are computed only where a label is predicted (``logits_to_keep``, so
the model's own head, logit scaling or soft-capping included), never over the whole sequence.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers.utils import ModelOutput

from cpt import _compat, attention, checkpointing
from cpt.config import CPTConfig, is_label, is_trainable
from cpt.loss import LossTerms, label_weights, weighted_cross_entropy
from cpt.projection import epsilons, project_

IGNORE_INDEX = -100
"""Label value that marks a position as not a target, as in `transformers`."""

ContextSharing = Literal["auto", "always", "never"]
CONTEXT_SHARING_MODES = ("auto", "always", "never")

SHARED_ATTENTION_MIN_ROWS = 16384
"""B x N from which the samples attend to one copy of the context (`cpt.attention`) rather than
through `transformers`' cache, which copies it B times. Below it the copies are cheap and
`transformers`' fused attention kernels are faster. Measured on one H200, 8B model, same run
(benchmarks/RESULTS.md): N = 512, B = 8: 249 ms with the cache, 239 ms with one copy;
N = 2048, B = 8: 249 ms and 35.1 GiB with the cache, 277 ms and 29.3 GiB with one copy (so from
here memory wins); N = 8192, B = 8: 808 ms and 91.7 GiB with the cache (an earlier run), 775 ms
and 68.5 GiB with one copy."""

SHARED_ATTENTION_MIN_ROWS_INFERENCE = 32768
"""The same threshold without gradients, where the B copies are not kept for a backward pass:
8 queries took 38 ms with the cache and 56 ms with one copy at N = 2048, but 111 ms with the
cache and 70 ms with one copy at N = 8192 (H200, 8B)."""


@dataclass
class CPTOutput(ModelOutput):
    """What `CPTModel.forward` returns (a `transformers` ModelOutput, so `Trainer` can read it).

    Attributes:
        loss: scalar CPT loss (SPEC §4) when ``labels`` were given, else None.
        logits: (B, S, V) logits over the sample's own positions when no ``labels`` were given,
            else None (training never builds them).
        num_targets: number of label positions the loss averages over (None without labels).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_targets: int | None = None


@dataclass
class ContextCache:
    """The trained context, run once through the frozen model, for inference.

    Attributes:
        tensors: (keys, values) per layer, each (1, heads, N, head_dim).
        last_logits: (V,) float32 logits at the context's last position (they score the first
            token that follows the context).
        num_tokens: N.
    """

    tensors: list[tuple[torch.Tensor, torch.Tensor]]
    last_logits: torch.Tensor
    num_tokens: int


@dataclass
class SharedLossPlan:
    """Where the loss terms of a batch are, for `CPTModel.shared_loss_total` (made by
    `CPTModel.shared_loss_plan`). K is the number of sample positions whose logits are kept.

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
        count: target positions the loss averages over.
    """

    keep: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    first_labels: torch.Tensor
    first_weights: torch.Tensor
    context_weights: torch.Tensor
    attention_mask: torch.Tensor | None
    count: int

    def to(self, device: torch.device) -> SharedLossPlan:
        """The plan with its tensors on ``device`` (copied without blocking the host)."""
        moved = {
            name: None if value is None else to_device(value, device)
            for name, value in vars(self).items()
            if name != "count"
        }
        return SharedLossPlan(**moved, count=self.count)


class CPTModel(nn.Module):
    """Wraps any `transformers` causal LM with a CPT context.

    The base model is frozen. The context's embeddings are ``base + delta``: ``base`` holds the
    model's word embeddings of ``config.cpt_token_ids`` (float32, fixed), ``delta`` (float32,
    trainable, zero at start) moves only on input-template, input and output-template rows, each
    row inside its own L2 ball (`project_`).

    Args:
        base_model: a `transformers` causal LM (``AutoModelForCausalLM``); frozen in place.
        config: the context.
        context_sharing: ``"auto"`` runs the context once per batch when the batch has more than
            one sample and labels; ``"always"`` and ``"never"`` force the choice.
        compile_projection: fuse the projection with ``torch.compile``; None compiles on CUDA
            only.
        activation_checkpointing: keep only each layer's input during the forward pass and
            recompute the rest in the backward pass (`cpt.checkpointing`): long contexts fit in
            far less memory, for one more forward pass. Works with the shared context.
        shared_attention: with a shared context, let the samples attend to one copy of it
            (`cpt.attention`) instead of B copies in a `transformers` cache: less memory, and
            faster at long contexts. None decides by B x N (`SHARED_ATTENTION_MIN_ROWS`).

    Raises:
        ValueError: if the context does not fit the model (ids outside the vocabulary).
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: CPTConfig,
        *,
        context_sharing: ContextSharing = "auto",
        compile_projection: bool | None = None,
        activation_checkpointing: bool = False,
        shared_attention: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, CPTConfig):
            raise ValueError(f"config must be a CPTConfig, got {type(config).__name__}")
        if context_sharing not in CONTEXT_SHARING_MODES:
            raise ValueError(f"context_sharing must be one of {CONTEXT_SHARING_MODES}, got {context_sharing!r}")
        embeddings = _input_embeddings(base_model)
        vocab_size, hidden_size = embeddings.weight.shape
        too_big = [i for i in config.cpt_token_ids if i >= vocab_size]
        if too_big:
            raise ValueError(
                f"cpt_token_ids holds id {too_big[0]}, outside the model's vocabulary of {vocab_size}"
            )
        self.base_model = base_model
        self.base_model.requires_grad_(False)
        self.config = config
        self.context_sharing = context_sharing
        self.compile_projection = compile_projection
        self.hidden_size = hidden_size
        if activation_checkpointing:
            checkpointing.enable(base_model)

        device = embeddings.weight.device
        ids = torch.tensor(config.cpt_token_ids, dtype=torch.long, device=device)
        codes = torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long, device=device)
        with torch.no_grad():
            base = embeddings(ids).detach().to(torch.float32).clone()  # (N, d)
        self.register_buffer("base", base)
        self.delta = nn.Parameter(torch.zeros_like(base))  # (N, d)
        self.register_buffer("context_ids", ids, persistent=False)  # (N,)
        self.register_buffer("context_codes", codes, persistent=False)  # (N,)
        self.register_buffer(
            "context_mask", torch.tensor(config.cpt_mask, dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer("trainable_rows", is_trainable(codes).unsqueeze(1), persistent=False)  # (N, 1)
        self.register_buffer("epsilon", epsilons(config, hidden_size).to(device), persistent=False)  # (N,)
        self._warned_fallback = False
        # Facts of the fixed context, kept as Python values: reading them off the GPU between
        # the context pass and the sample pass would stall the launch queue.
        self._context_fully_visible = all(config.cpt_mask)
        self._max_context_code = max(config.cpt_tokens_type_mask)  # samples' codes start above it
        context_targets = _target_mask(codes.unsqueeze(0), ids.unsqueeze(0))[0]
        positions = context_targets.nonzero(as_tuple=True)[0]  # (Mc,) in 1..N-1: the context's labels
        self._context_plan = (codes.cpu(), positions.cpu())  # what `shared_loss_plan` reads, on the CPU
        self.register_buffer("context_target_ids", ids[positions], persistent=False)  # (Mc,)
        last = positions.new_tensor([config.num_virtual_tokens - 1])
        self.register_buffer("context_keep", torch.cat([positions - 1, last]), persistent=False)  # (Mc + 1,)
        self.shared_attention = shared_attention
        self._cached_context: tuple[tuple, ContextCache] | None = None  # see context_cache()
        self.task: dict | None = None  # template and label set, saved with the adapter (cpt.workflow)

    # ------------------------------------------------------------------ parameters

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should update: ``[delta]``."""
        return [self.delta]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights: ``base`` and ``delta``, each (N, d) float32, detached."""
        return {"base": self.base.detach(), "delta": self.delta.detach()}

    def state_dict(  # type: ignore[no-untyped-def, override]
        self, *, destination=None, prefix: str = "", keep_vars: bool = False
    ):
        """The adapter's tensors, ``base`` and ``delta``, not the frozen base model's weights
        (they belong to the base model and load with it). So what `transformers.Trainer` saves
        of a CPTModel is the adapter alone, and a model whose input and output embeddings share
        one tensor saves without complaint."""
        destination = {} if destination is None else destination
        for name, tensor in (("base", self.base), ("delta", self.delta)):
            destination[prefix + name] = tensor if keep_vars else tensor.detach()
        return destination

    def load_state_dict(  # type: ignore[no-untyped-def, override]
        self, state_dict, strict: bool = True, assign: bool = False
    ):
        """Copies ``base`` and ``delta`` from a `state_dict` of a CPTModel of the same context.

        Raises:
            RuntimeError: with ``strict``, if keys are missing or unexpected (as `torch.nn`);
                whatever the mode, if a tensor's shape differs.
        """
        from torch.nn.modules.module import _IncompatibleKeys

        names = ("base", "delta")
        missing = [name for name in names if name not in state_dict]
        unexpected = [key for key in state_dict if key not in names]
        if strict and (missing or unexpected):
            raise RuntimeError(f"CPTModel state_dict: missing keys {missing}, unexpected keys {unexpected}")
        with torch.no_grad():
            for name in names:
                if name in state_dict:
                    target = getattr(self, name)
                    value = state_dict[name]
                    if tuple(value.shape) != tuple(target.shape):
                        raise RuntimeError(
                            f"CPTModel state_dict: {name} has shape {tuple(value.shape)}, "
                            f"the model's is {tuple(target.shape)}"
                        )
                    target.copy_(value)
        return _IncompatibleKeys(missing, unexpected)

    def context_embeddings(self) -> torch.Tensor:
        """(N, d) float32 context embeddings: frozen ``base`` + projected ``delta``."""
        return self.base + self.delta

    def train(self, mode: bool = True) -> CPTModel:
        """Sets the training mode of the module; the frozen base model always stays in eval mode
        (no dropout), also when `transformers.Trainer` calls ``model.train()`` each step."""
        super().train(mode)
        self.base_model.eval()
        return self

    def is_projected(self, rtol: float = 1e-5) -> bool:
        """Whether every row of ``delta`` is inside its ball (up to float rounding, ``rtol``)."""
        norms = torch.linalg.vector_norm(self.delta.detach(), dim=1)
        return bool(torch.all(norms <= self.epsilon * (1 + rtol)))

    def project_(self) -> None:
        """Projects every row of ``delta`` onto its L2 ball (SPEC §3); call after each step."""
        compile = self.compile_projection
        if compile is None:
            compile = self.delta.is_cuda
        project_(self.delta, self.epsilon, compile=compile)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # `.to(dtype)` and friends reach the base model; the adapter stays float32, only moves.
        base, delta = self.base, self.delta.data
        super()._apply(fn, recurse)
        device = self.delta.device
        self.base = base.to(device)
        self.delta.data = delta.to(device)
        return self

    # ------------------------------------------------------------------ forward

    accepts_loss_kwargs = True
    """Tells `transformers.Trainer` that `forward` takes ``num_items_in_batch``: it then leaves
    the loss's normalisation to the model, over the whole accumulated (and all-rank) batch."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        input_type_mask: torch.Tensor | None = None,
        *,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
    ) -> CPTOutput:
        """Runs the model over ``[context ; sample]``.

        The batch's tensors may be on the CPU (as a collator makes them) or on the model's
        device; on the CPU, the shared-context path reads its targets there without waiting for
        the GPU.

        Args:
            input_ids: (B, S) token ids of the samples, right-padded.
            attention_mask: (B, S) 1 for real tokens, 0 for padding; None means all real.
            labels: (B, S) target ids (usually ``input_ids``); -100 marks ignored positions.
                Given, the CPT loss is returned.
            input_type_mask: (B, S) type codes 0..4 of the samples (SPEC §1); None treats every
                sample token as a label, as PEFT does. Never modified.
            num_items_in_batch: the number of loss terms in the whole batch this one is part of
                (all micro-batches of an optimizer step, on all ranks), as `transformers.Trainer`
                passes it; the loss is then this batch's weighted sum over it, so the gradients
                summed over micro-batches and ranks are those of the whole batch. None: this
                batch's own count (`loss_targets`).
            shift_labels: (B, T) this batch's loss targets (`loss_targets`), which
                `cpt.callback.TrainerCollator` adds so that `transformers.Trainer` counts
                ``num_items_in_batch`` as CPT does; only checked against the batch.

        Returns:
            `CPTOutput`: ``loss`` with labels; else ``logits`` (B, S, V) of the sample positions.

        Raises:
            ValueError: on shapes that differ from ``input_ids``, negative type codes, a batch
                without any label token, ``num_items_in_batch`` below 1, or ``shift_labels``
                that count other loss terms than the batch has.
        """
        _check_batch(input_ids, attention_mask, labels, input_type_mask)
        _check_num_items(num_items_in_batch)
        if labels is None:
            return CPTOutput(logits=self.sample_logits(input_ids, attention_mask))
        if self._share_context(input_ids.shape[0]):
            plan = self.shared_loss_plan(labels, input_type_mask, attention_mask)
            _check_shift_labels(shift_labels, plan.count)
            total = self.shared_loss_total(input_ids, plan.to(self.delta.device))
            divisor = plan.count if num_items_in_batch is None else num_items_in_batch
            return CPTOutput(loss=total / divisor, num_targets=plan.count)
        _check_type_codes(input_type_mask)
        device = self.delta.device
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        codes = self._sample_codes(input_ids, input_type_mask)  # (B, S)
        terms = self._plain_loss_terms(input_ids, attention_mask, labels.to(device), codes)
        _check_shift_labels(shift_labels, terms.count)
        loss = terms.mean() if num_items_in_batch is None else terms.total / num_items_in_batch
        return CPTOutput(loss=loss, num_targets=terms.count)

    def loss_targets(self, labels: torch.Tensor, input_type_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The token ids the CPT loss predicts for each row of a batch, worked out on the CPU.

        Their count (entries other than -100) is the batch's number of loss terms: what
        ``num_items_in_batch`` sums over micro-batches and ranks.

        Args:
            labels: (B, S) target ids; -100 marks ignored positions.
            input_type_mask: (B, S) sample type codes 0..4, or None (every token a label).

        Returns:
            (B, Mc + S) long: the context's Mc label tokens, then the sample's labels where they
            are targets, -100 elsewhere.

        Raises:
            ValueError: on a negative type code.
        """
        cpu = torch.device("cpu")
        labels = labels.to(cpu)
        type_mask = None if input_type_mask is None else input_type_mask.to(cpu)
        _check_type_codes(type_mask)
        codes = self._sample_codes(labels, type_mask)  # (B, S)
        targets = is_label(codes) & (labels != IGNORE_INDEX)  # (B, S)
        context = self.context_target_ids.to(cpu).expand(labels.shape[0], -1)  # (B, Mc)
        return torch.cat([context, torch.where(targets, labels, IGNORE_INDEX)], dim=1)

    def _share_context(self, batch_size: int) -> bool:
        if self.context_sharing == "never":
            return False
        if self.context_sharing not in CONTEXT_SHARING_MODES:  # the attribute may be set later
            raise ValueError(
                f"context_sharing must be one of {CONTEXT_SHARING_MODES}, got {self.context_sharing!r}"
            )
        if self.context_sharing == "auto" and batch_size == 1:
            return False  # one sample gains nothing from sharing: two passes cost more than one
        reason = self._sharing_obstacle()
        if reason is not None:
            if not self._warned_fallback:
                warnings.warn(f"context sharing is off: {reason}; using the plain path", stacklevel=3)
                self._warned_fallback = True
            return False
        return True

    def _sharing_obstacle(self) -> str | None:
        """Why the context's KV cache cannot stand in for running it with each sample, or None."""
        if _is_checkpointing(self.base_model):
            return (
                "transformers' gradient checkpointing drops KV caches (use "
                "CPTModel(..., activation_checkpointing=True) instead)"
            )
        window = _compat.sliding_window(self.base_model.config)
        if window is not None and self.num_virtual_tokens > window - 1:
            return f"the context ({self.num_virtual_tokens} tokens) is longer than the sliding window ({window})"
        return None

    def _context_for_forward(self, dtype: torch.dtype) -> torch.Tensor:
        # Same values as context_embeddings(); the gradient reaches only trainable rows (SPEC §2).
        delta = torch.where(self.trainable_rows, self.delta, self.delta.detach())
        return (self.base + delta).to(dtype)  # (N, d)

    def _context_pass(self):  # type: ignore[no-untyped-def]
        """How the context's own pass attends: causal SDPA without a mask where the context is
        fully visible (`cpt.attention.causal_context`), the model's own way elsewhere."""
        if not self._context_fully_visible:
            return nullcontext()
        return attention.causal_context(self.base_model)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _input_embeddings(self.base_model)(input_ids)  # (B, S, d)

    def _sample_codes(self, input_ids: torch.Tensor, input_type_mask: torch.Tensor | None) -> torch.Tensor:
        # Sample codes move above the context's so the two never collide (SPEC §1).
        offset = self._max_context_code
        if input_type_mask is None:
            return torch.full_like(input_ids, 4 + offset)
        codes = input_type_mask.to(device=input_ids.device, dtype=torch.long)
        return torch.where(codes > 0, codes + offset, codes)

    def _full_attention_mask(
        self, attention_mask: torch.Tensor | None, batch_size: int, seq_len: int
    ) -> torch.Tensor | None:
        if attention_mask is None and self._context_fully_visible:
            return None  # as PEFT: no mask at all when the caller gives none
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=self.context_mask.device)
        context = self.context_mask.unsqueeze(0).expand(batch_size, -1).to(attention_mask.dtype)
        return torch.cat([context, attention_mask.to(context.device)], dim=1)  # (B, N + S)

    def _plain_loss_terms(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        codes: torch.Tensor,
    ) -> LossTerms:
        batch_size, seq_len = input_ids.shape
        embeds = self._embed(input_ids)  # (B, S, d)
        context = self._context_for_forward(embeds.dtype).unsqueeze(0).expand(batch_size, -1, -1)
        full_codes = torch.cat([self.context_codes.expand(batch_size, -1), codes], dim=1)  # (B, N+S)
        full_labels = torch.cat([self.context_ids.expand(batch_size, -1), labels.to(codes.device)], dim=1)
        targets = _target_mask(full_codes, full_labels)  # (B, N+S)
        rows, positions = targets.nonzero(as_tuple=True)
        _require_targets(rows.numel())
        keep = torch.unique(positions - 1)  # sorted hidden positions that predict a target
        output = self.base_model(
            inputs_embeds=torch.cat([context, embeds], dim=1),
            attention_mask=self._full_attention_mask(attention_mask, batch_size, seq_len),
            logits_to_keep=keep,
            use_cache=False,
        )
        logits = output.logits[rows, torch.searchsorted(keep, positions - 1)]  # (M, V)
        weights = label_weights(full_codes, self.config)[rows, positions]  # (M,)
        return LossTerms.of(logits, full_labels[rows, positions], weights)

    def shared_loss_plan(
        self,
        labels: torch.Tensor,
        input_type_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        pad_targets_to: int = 1,
    ) -> SharedLossPlan:
        """Where a batch's loss terms are and what they weigh, worked out on the CPU.

        Everything in the shared-context loss that depends on the batch's values (which
        positions are targets, their weights, how many there are) is decided here, so that the
        passes over the model (`shared_loss_total`) never read a value back from the GPU: the
        host queues the whole step without waiting, and the step can be replayed as a CUDA
        graph (`cpt.graphs`). Tensors given on the GPU are copied to the CPU once.

        Args:
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
        cpu = torch.device("cpu")
        labels = labels.to(cpu)
        type_mask = None if input_type_mask is None else input_type_mask.to(cpu)
        _check_type_codes(type_mask)
        codes = self._sample_codes(labels, type_mask)  # (B, S)
        batch_size = labels.shape[0]
        n = self.num_virtual_tokens
        context_codes, context_positions = self._context_plan
        full_codes = torch.cat([context_codes.expand(batch_size, -1), codes], dim=1)  # (B, N+S)
        weights = label_weights(full_codes, self.config)  # (B, N+S)
        sample_weights = weights[:, n:]  # (B, S)

        targets = is_label(codes) & (labels != IGNORE_INDEX)  # (B, S)
        count = batch_size * context_positions.numel() + int(targets.sum())
        _require_targets(count)
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

        has_padding = attention_mask is not None and not bool(attention_mask.to(cpu).all())
        return SharedLossPlan(
            keep=keep,
            labels=kept_labels,
            weights=kept_weights,
            first_labels=torch.where(first, labels[:, 0], 0),
            first_weights=torch.where(first, sample_weights[:, 0], zero),
            context_weights=weights[:, context_positions].sum(dim=0),  # each term counts once per row
            attention_mask=attention_mask if has_padding else None,  # all ones: the same as none
            count=count,
        )

    def shared_loss_total(self, input_ids: torch.Tensor, plan: SharedLossPlan) -> torch.Tensor:
        """The weighted sum of the batch's cross-entropy terms (the loss is it over
        ``plan.count``), by the shared context: the context runs once, the samples against it.

        Reads nothing back from the GPU, so it can be captured in a CUDA graph.

        Args:
            input_ids: (B, S) sample ids.
            plan: from `shared_loss_plan`, on the model's device (`SharedLossPlan.to`).

        Returns:
            0-dim float32 tensor.
        """
        input_ids = to_device(input_ids, self.delta.device)
        batch_size = input_ids.shape[0]
        # The context, once: its KV cache keeps the gradient to delta.
        embeds = self._embed(input_ids)  # (B, S, d)
        context = self._context_for_forward(embeds.dtype).unsqueeze(0)  # (1, N, d)
        context_mask = None if self._context_fully_visible else self.context_mask.unsqueeze(0)
        cache = _compat.SealableCache(config=self.base_model.config)
        with self._context_pass():
            context_out = self.base_model(
                inputs_embeds=context,
                attention_mask=context_mask,
                logits_to_keep=self.context_keep,
                use_cache=True,
                **_compat.cache_kwargs(self.base_model, cache),
            )
        cache.sealed = True  # checkpointed layers recompute in backward without writing again
        context_logits = context_out.logits[0]  # (Mc + 1, V): the context's targets, then its last position

        # The samples, against the context's cache.
        sample_logits = self._run_against_context(
            embeds, plan.attention_mask, _compat.cache_tensors(cache), logits_to_keep=plan.keep
        ).logits  # (B, K, V)

        total = weighted_cross_entropy(context_logits[:-1], self.context_target_ids, plan.context_weights)
        last = context_logits[-1:].expand(batch_size, -1)  # (B, V)
        total = total + weighted_cross_entropy(last, plan.first_labels, plan.first_weights)
        vocab = sample_logits.shape[-1]
        return total + weighted_cross_entropy(
            sample_logits.reshape(-1, vocab), plan.labels.reshape(-1), plan.weights.reshape(-1)
        )

    # ------------------------------------------------------------------ inference

    @property
    def can_share_context(self) -> bool:
        """Whether the shared-context path computes exactly the plain path's loss for this
        model (not when the context outruns a sliding window, or under `transformers`' own
        gradient checkpointing)."""
        return self._sharing_obstacle() is None

    @property
    def can_cache_context(self) -> bool:
        """Whether `build_context_cache` gives exactly the logits of running the context again."""
        obstacle = self._sharing_obstacle()
        return obstacle is None or obstacle.startswith("transformers' gradient checkpointing")

    def context_cache(self) -> ContextCache:
        """The context's KV cache, built on first use and kept while the adapter is unchanged.

        It is rebuilt when ``delta`` or ``base`` has changed since (an optimizer step, a
        projection, a load) or the model moved to another device or dtype, so every
        `cpt.infer.classify` or `cpt.infer.generate` call on a trained adapter reuses one cache.
        """
        key = (
            self.delta._version, self.delta.data_ptr(), self.base._version, self.base.data_ptr(),
            _input_embeddings(self.base_model).weight.dtype,
        )
        if self._cached_context is None or self._cached_context[0] != key:
            self._cached_context = (key, self.build_context_cache())
        return self._cached_context[1]

    @torch.no_grad()
    def build_context_cache(self) -> ContextCache:
        """Runs the (constant, trained) context once and keeps its KV cache for inference.

        Raises:
            ValueError: where a cache cannot stand in for the context (`can_cache_context`).
        """
        if not self.can_cache_context:
            raise ValueError(f"the context cannot be cached: {self._sharing_obstacle()}")
        embeds_dtype = _input_embeddings(self.base_model).weight.dtype
        context = self._context_for_forward(embeds_dtype).unsqueeze(0)  # (1, N, d)
        context_mask = None if self._context_fully_visible else self.context_mask.unsqueeze(0)
        n = self.num_virtual_tokens
        with self._context_pass():
            output = self.base_model(
                inputs_embeds=context,
                attention_mask=context_mask,
                logits_to_keep=self.context_keep[-1:],  # the last position
                use_cache=True,
            )
        cache = _compat.output_cache(output)
        return ContextCache(_compat.cache_tensors(cache), output.logits[0, -1].float(), n)

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
        batch_size, seq_len = input_ids.shape
        n = self.num_virtual_tokens
        embeds = self._embed(input_ids)
        full_mask = self._full_attention_mask(attention_mask, batch_size, seq_len)
        if positions is None:
            positions = torch.arange(seq_len, device=embeds.device)
        positions = positions.to(device=embeds.device, dtype=torch.long)
        if context_cache is None:
            context = self._context_for_forward(embeds.dtype).unsqueeze(0).expand(batch_size, -1, -1)
            output = self.base_model(
                inputs_embeds=torch.cat([context, embeds], dim=1),
                attention_mask=full_mask,
                logits_to_keep=positions + n,
                use_cache=False,
            )
            return output.logits
        return self._run_against_context(
            embeds, attention_mask, context_cache.tensors, logits_to_keep=positions
        ).logits

    def _use_shared_attention(self, batch_size: int, seq_len: int) -> bool:
        n = self.num_virtual_tokens
        if not attention.supports(self.base_model, n, seq_len):
            return False
        if self.shared_attention is None:  # auto: where the B copies would be large
            training = torch.is_grad_enabled()
            return batch_size * n >= (SHARED_ATTENTION_MIN_ROWS if training else SHARED_ATTENTION_MIN_ROWS_INFERENCE)
        return bool(self.shared_attention)

    def _run_against_context(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        context: list[tuple[torch.Tensor, torch.Tensor]],
        logits_to_keep: torch.Tensor,
    ):  # type: ignore[no-untyped-def]
        """Runs the samples (B, S, d) after the context whose per-layer KV states are given.

        Where `cpt.attention` supports the model, the samples attend to the one batch-1 copy of
        the context; elsewhere the context's states are broadcast into a `transformers` cache.
        """
        batch_size, seq_len = embeds.shape[:2]
        full_mask = self._full_attention_mask(attention_mask, batch_size, seq_len)
        config = self.base_model.config
        if self._use_shared_attention(batch_size, seq_len):
            context_mask = None if self._context_fully_visible else self.context_mask
            with attention.shared_context(self.base_model, context, context_mask, attention_mask):
                return self.base_model(
                    inputs_embeds=embeds,
                    attention_mask=full_mask,
                    logits_to_keep=logits_to_keep,
                    use_cache=True,
                    **_compat.cache_kwargs(self.base_model, _compat.sealed_cache(context, config)),
                )
        cache = _compat.expanded_cache(context, batch_size, config, read_only=True)
        return self.base_model(
            inputs_embeds=embeds,
            attention_mask=full_mask,
            logits_to_keep=logits_to_keep,
            use_cache=True,
            **_compat.cache_kwargs(self.base_model, cache),
        )

    # ------------------------------------------------------------------ files

    def save_pretrained(self, path: str | Path, format: Literal["cpt", "peft"] = "cpt") -> Path:
        """Writes the adapter to the folder ``path`` (projecting first if a row is outside its
        ball); see `cpt.adapter`."""
        from cpt.adapter import save_adapter

        if not self.is_projected():  # projecting a projected delta again moves rows by an ulp
            self.project_()
        return save_adapter(self, path, format=format)

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, path: str | Path, *, revision: str | None = None, **kwargs
    ) -> CPTModel:
        """Loads an adapter in either layout (detected) onto ``base_model``.

        ``path`` is an adapter folder or a hub name (``org/name``, at ``revision``), resolved
        by `cpt.hub.resolve_adapter`: from the local Hugging Face cache, else downloaded."""
        from cpt.adapter import load_adapter
        from cpt.hub import resolve_adapter

        return load_adapter(base_model, resolve_adapter(path, revision=revision), **kwargs)

    # ------------------------------------------------------------------ conveniences (as in PEFT)

    @property
    def device(self) -> torch.device:
        """Where the base model's input embeddings are: where inputs go."""
        return _input_embeddings(self.base_model).weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The base model's parameter dtype (its input embeddings'); ``base`` and ``delta`` stay
        float32."""
        return _input_embeddings(self.base_model).weight.dtype

    def get_base_model(self) -> nn.Module:
        """The wrapped (frozen) base model."""
        return self.base_model

    def print_trainable_parameters(self) -> None:
        """Prints the trainable (``delta``) and total parameter counts, as PEFT models do."""
        params = list(self.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    def generate(self, tokenizer, texts, **kwargs):  # type: ignore[no-untyped-def]
        """Generates after the trained context: `cpt.infer.generate`, with the template the model
        was trained with (``self.task``) unless ``template`` is given.

        Returns:
            One generated string per text.
        """
        from cpt.infer import generate
        from cpt.workflow import template_of

        kwargs.setdefault("template", template_of(self))
        return generate(self, tokenizer, texts, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:  # type: ignore[no-untyped-def]
        """Uploads the adapter with a model card to the hub repository ``repo_id``: see
        `cpt.hub.push_to_hub` for the options. Returns the commit's URL."""
        from cpt.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)


def _input_embeddings(model: nn.Module) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is None or not hasattr(embeddings, "weight"):
        raise ValueError(f"{type(model).__name__} has no input embeddings; CPT needs a causal LM")
    return embeddings


def _is_checkpointing(model: nn.Module) -> bool:
    # transformers renamed the flag; read whichever this release has without a deprecation warning
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _target_mask(codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) True where position p is a label with a target; position 0 has no predictor."""
    targets = is_label(codes) & (labels != IGNORE_INDEX)
    targets[:, 0] = False
    return targets


def _require_targets(count: int) -> None:
    if count == 0:
        raise ValueError(
            "the batch has no label token: no position has a type code that is a positive multiple "
            "of 4 with a label other than -100"
        )


def _check_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    input_type_mask: torch.Tensor | None,
) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, seq_len) tensor, got {shape}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens (seq_len 0)")
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels), ("input_type_mask", input_type_mask)):
        if tensor is not None and tuple(tensor.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but input_ids has shape {tuple(input_ids.shape)}"
            )


def _check_num_items(num_items_in_batch: int | torch.Tensor | None) -> None:
    if num_items_in_batch is None or isinstance(num_items_in_batch, torch.Tensor):
        return  # a tensor stays where it is: reading it would make the host wait for the device
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)) or not (
        num_items_in_batch >= 1
    ):
        raise ValueError(f"num_items_in_batch must be a number >= 1, got {num_items_in_batch!r}")


def _check_shift_labels(shift_labels: torch.Tensor | None, count: int) -> None:
    if shift_labels is None:
        return
    counted = int((shift_labels != IGNORE_INDEX).sum())
    if counted != count:
        raise ValueError(
            f"shift_labels counts {counted} loss terms but the batch has {count}: build the batches "
            "with cpt.callback.TrainerCollator for this model's context"
        )


def _check_type_codes(input_type_mask: torch.Tensor | None) -> None:
    if input_type_mask is not None and bool((input_type_mask < 0).any()):
        raise ValueError(f"input_type_mask has a type code below 0: {int(input_type_mask.min())}")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to a GPU through pinned memory, without
    making the host wait for the work already queued there."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
