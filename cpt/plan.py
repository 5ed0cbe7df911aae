"""Which path a call takes: one policy function, `resolve`, makes an immutable `Plan`.

Every pass of `cpt` can run in more than one exact way, and the choice is a trade of speed and
memory that depends on the model, the context length N, the batch, the device and the user's
options. `resolve` takes all of these as plain values and returns a `Plan`; `CPTModel.forward`,
`cpt.train`, `cpt.infer` and `cpt.graphs` read it and decide nothing themselves.

The decisions:

- **shared or plain**: the context runs once and the B samples against its KV cache (exact by
  causal attention), or ``[context ; sample]`` runs for each sample. At inference, "shared" means
  the context's cache built once stands in for the context.
- **one copy**: with a shared context, the samples attend to one copy of it (`cpt.attention`)
  rather than to B copies in a `transformers` cache.
- **graphs**: the passes replay from CUDA graphs (`cpt.graphs`).
- **query once** (`cpt.infer.classify`): each query runs once and every label's continuation
  against it.
- **causal context pass**: the context's own pass runs SDPA as causal with no mask
  (`cpt.attention.causal_context`), for models whose attention goes through the interface.

- **sharded**: a base model sharded with FSDP2 runs eagerly (`Why.SHARDED`).
- **compiled projection** (`compiles_projection`): ``torch.compile`` fuses the projection on CUDA.

The options speak one vocabulary, ``"auto"``, ``"on"``, ``"off"`` (`choice`), checked once where
they are given; the older spellings (``"always"``, ``"never"``, True, False, None) are refused
with a message that names the one to write.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Literal

Choice = Literal["auto", "on", "off"]
CHOICES: tuple[Choice, ...] = ("auto", "on", "off")
_OLD_SPELLINGS: dict[object, Choice] = {"always": "on", "never": "off", True: "on", False: "off", None: "auto"}
"""Spellings accepted before the one vocabulary, and the value each one meant."""

Purpose = Literal["loss", "train", "infer"]
"""What the call computes: ``"loss"`` an eager forward with labels (`CPTModel.forward`),
``"train"`` a step of `cpt.train.train` (which CUDA graphs may replay), ``"infer"`` logits
against the context (`CPTModel.sample_logits`, `cpt.infer`)."""

ONE_COPY_MIN_ROWS = 16384
"""B x N from which the samples attend to one copy of the context while gradients are recorded.
Below it `transformers`' fused kernels over B copies are faster; from it the B copies kept for
the backward pass cost more memory than they save time (an 8B Llama on an H200, cases 8b:512:8
and 8b:2048:8 of benchmarks/results-h200-run3.jsonl against benchmarks/results-h200-run3-one-copy.jsonl)."""

ONE_COPY_MIN_ROWS_INFERENCE = 32768
"""The same threshold without gradients, where the B copies are not kept: at B x N = 16384 one
copy was still the slower at inference (the same two files)."""


class Why(Enum):
    """Why a plan does not take a faster path."""

    OPTION_OFF = "the option turns it off"
    ONE_SAMPLE = "one sample gains nothing from running the context apart"
    HF_CHECKPOINTING = (
        "transformers' gradient checkpointing drops KV caches "
        "(use CPTModel(..., activation_checkpointing=True) instead)"
    )
    SLIDING_WINDOW = "the context outruns the model's sliding attention window"
    NOT_EXACT = "the model's attention does not give one-copy attention's exact result (probe)"
    SMALL = "B x N is below the size where one copy pays off"
    NOT_CUDA = "the model is not on a CUDA device"
    PLAIN = "the context is neither shared nor cached, and graphs replay only that path"
    EAGER = "the call is eager (graphs replay the steps of cpt.train and the passes of cpt.infer)"
    SHARDED = (
        "the base model is sharded with FSDP2: its layers gather their weights with collectives, "
        "which a CUDA graph does not replay"
    )


@dataclass(frozen=True)
class Options:
    """The user's options, each ``"auto"``, ``"on"`` or ``"off"`` (see `choice`).

    Attributes:
        context_sharing: shared context or plain path (``"auto"``: shared from two samples on).
        shared_attention: one copy of the context (``"auto"``: from `ONE_COPY_MIN_ROWS`).
        cuda_graphs: CUDA graphs (``"auto"``: on a CUDA device where the path allows them).
        context_cache: at inference, the context's cache stands in for the context.
    """

    context_sharing: Choice = "auto"
    shared_attention: Choice = "auto"
    cuda_graphs: Choice = "auto"
    context_cache: Choice = "auto"

    def __post_init__(self) -> None:
        for name in ("context_sharing", "shared_attention", "cuda_graphs", "context_cache"):
            object.__setattr__(self, name, choice(name, getattr(self, name)))


@dataclass(frozen=True)
class Facts:
    """What the policy needs to know about the base model.

    Attributes:
        sliding_window: the smallest sliding attention window of its layers, None if none.
        hf_checkpointing: `transformers`' own gradient checkpointing is on.
        one_copy_exact: its attention goes through `transformers`' AttentionInterface and
            one-copy attention reproduced it on a probe.
        device_type: where the model runs (``"cpu"``, ``"cuda"``, ...).
        sharded: FSDP2 shards its decoder layers (`cpt.distributed.shard_base_model`).
    """

    sliding_window: int | None = None
    hf_checkpointing: bool = False
    one_copy_exact: bool = True
    device_type: str = "cpu"
    sharded: bool = False


@dataclass(frozen=True)
class Plan:
    """How one call runs; see the module docstring. A ``why_*`` field says why the faster path
    was not taken (None where it was)."""

    shared: bool
    one_copy: bool = False
    graphs: bool = False
    query_once: bool = False
    causal_context: bool = False
    why_plain: Why | None = None
    why_not_one_copy: Why | None = None
    why_no_graphs: Why | None = None

    @property
    def cached(self) -> bool:
        """At inference: whether the context's cache stands in for the context."""
        return self.shared


class Option:
    """An option attribute of a class that keeps its `Options` in ``options``: reading gives the
    option's value, setting checks it (`choice`) and replaces ``options``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Choice | Option:
        return self if obj is None else getattr(obj.options, self.name)

    def __set__(self, obj: object, value: object) -> None:
        obj.options = replace(obj.options, **{self.name: value})


def choice(name: str, value: object) -> Choice:
    """``value``, checked to be one of the options' one vocabulary, ``"auto"``, ``"on"``, ``"off"``.

    Raises:
        ValueError: naming ``name``, for anything else; for an older spelling (``"always"``,
            ``"never"``, True, False, None), naming the value to write instead.
    """
    if isinstance(value, str) and value in CHOICES:
        return value  # type: ignore[return-value]
    if value is None or isinstance(value, (str, bool)):
        meant = _OLD_SPELLINGS.get(value)
        if meant is not None:
            raise ValueError(f"{name}={value!r} is no longer accepted: write {name}={meant!r}")
    raise ValueError(f"{name} must be one of {CHOICES}, got {value!r}")


def compiles_projection(option: Choice, device_type: str) -> bool:
    """Whether the projection runs fused by ``torch.compile`` (`cpt.projection.project_fn`):
    ``"auto"`` compiles on CUDA only, where one fused kernel replaces several launches; on the
    CPU compiling costs seconds and saves little."""
    return option == "on" or (option == "auto" and device_type == "cuda")


def resolve(
    purpose: Purpose, options: Options, facts: Facts, *, num_context: int, batch_size: int, seq_len: int, grad: bool
) -> Plan:
    """The plan for one call.

    Args:
        purpose: what the call computes (`Purpose`).
        options: the user's options.
        facts: what the base model allows.
        num_context: N, the context's length.
        batch_size: B, the samples (or sequences) in the call.
        seq_len: S, the samples' length (padding included).
        grad: whether gradients are being recorded.

    Returns:
        The `Plan`.

    Raises:
        ValueError: where an option that is ``"on"`` cannot be honoured: CUDA graphs off a CUDA
            device or off the shared path, or a context cache the model cannot stand in for.
    """
    window = facts.sliding_window
    outruns = window is not None and num_context > window - 1
    if purpose == "infer":
        why_plain = Why.OPTION_OFF if options.context_cache == "off" else Why.SLIDING_WINDOW if outruns else None
        if why_plain is not None and options.context_cache == "on":
            raise ValueError(f"the context cannot be cached: {why_plain.value}")
    elif options.context_sharing == "off":
        why_plain = Why.OPTION_OFF
    elif facts.hf_checkpointing:
        why_plain = Why.HF_CHECKPOINTING
    elif outruns:
        why_plain = Why.SLIDING_WINDOW
    else:  # one sample shares only where graphs replay the step (they make up for the second pass),
        # or where the layers are sharded: every rank must take the same path, whatever its share
        alone = options.context_sharing == "auto" and batch_size == 1 and not facts.sharded
        why_plain = Why.ONE_SAMPLE if alone else None
    why_no_graphs = _why_no_graphs(purpose, options, facts, why_plain)
    if why_no_graphs is None:
        why_plain = None
    elif options.cuda_graphs == "on":
        raise ValueError(f"cuda_graphs is on but {why_no_graphs.value}")
    if why_plain is not None:
        return Plan(
            False,
            causal_context=facts.one_copy_exact,
            why_plain=why_plain,
            why_not_one_copy=why_plain,
            why_no_graphs=why_no_graphs,
        )

    why_not_one_copy = None
    if not facts.one_copy_exact:
        why_not_one_copy = Why.NOT_EXACT
    elif window is not None and num_context + seq_len > window:
        why_not_one_copy = Why.SLIDING_WINDOW
    elif options.shared_attention == "off":
        why_not_one_copy = Why.OPTION_OFF
    elif options.shared_attention == "auto":
        threshold = ONE_COPY_MIN_ROWS if grad else ONE_COPY_MIN_ROWS_INFERENCE
        why_not_one_copy = None if batch_size * num_context >= threshold else Why.SMALL
    # queries run once where nothing depends on a token's index in the padded batch: no graph
    # (its shapes are padded) and no sliding window (its reach is counted in indices)
    query_once = purpose == "infer" and why_no_graphs is not None and window is None
    return Plan(
        True,
        one_copy=why_not_one_copy is None,
        graphs=why_no_graphs is None,
        query_once=query_once,
        causal_context=facts.one_copy_exact,
        why_not_one_copy=why_not_one_copy,
        why_no_graphs=why_no_graphs,
    )


def _why_no_graphs(purpose: Purpose, options: Options, facts: Facts, why_plain: Why | None) -> Why | None:
    if purpose == "loss":
        return Why.EAGER
    if options.cuda_graphs == "off":
        return Why.OPTION_OFF
    if why_plain in (Why.OPTION_OFF, Why.HF_CHECKPOINTING, Why.SLIDING_WINDOW):
        return why_plain if why_plain is not Why.OPTION_OFF else Why.PLAIN
    if facts.sharded:
        return Why.SHARDED
    return Why.NOT_CUDA if facts.device_type != "cuda" else None
