"""Shared pieces of the benchmarks: random Llama-shaped models, synthetic CPT data, timers, output.

Models are built on the meta device and materialised directly on the target device in the target
dtype (``to_empty`` + one ``normal_`` per weight), so an 8B model costs an allocation and a few
hundred fast kernels rather than Hugging Face's per-module initialisation on the CPU.

Timers follow gpt-fast's habits: warm-up calls are excluded, the device is synchronised before
each clock read, the median is reported, and peak memory (``torch.cuda.max_memory_allocated``,
reset before each measurement) is the absolute peak, model weights included.
"""

from __future__ import annotations

import copy
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

EXAMPLE_ROLES: list[int] = [1] * 3 + [2] * 21 + [0] + [3] * 3 + [4] * 2 + [0] * 2
"""Roles of one rendered example of 32 tokens: input template (3), input (21), separator,
output template (3), label (2), end (2). See docs/method.md."""

EXAMPLE_LEN = len(EXAMPLE_ROLES)  # 32
CODES_PER_EXAMPLE = 4  # example k of the context uses codes 4k+1 .. 4k+4
INIT_STD = 0.02  # the usual initializer_range of Llama configs; keeps bf16 activations finite
FIRST_TOKEN_ID = 3  # random ids start above the usual pad/bos/eos ids

_LLAMA_COMMON = dict(
    max_position_embeddings=32768,  # room for the --long case (16384 + 32)
    rms_norm_eps=1e-5,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # a few hundred thousand parameters: CPU smoke tests
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
    # Llama-3.2-1B's shape (tied embeddings)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # Llama-3.1-8B's shape
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}

PRETRAINED_MODELS = ("smollm2-135m",)
"""Real models, loaded through `cpt.pretrained.load_model_and_tokenizer` when it is available."""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------- models


def llama_config(name: str) -> Any:
    """A `transformers.LlamaConfig` of the named shape (``tiny``, ``1b`` or ``8b``)."""
    from transformers import LlamaConfig

    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(MODEL_SHAPES)}")
    return LlamaConfig(**_LLAMA_COMMON, **MODEL_SHAPES[name], initializer_range=INIT_STD, attn_implementation="sdpa")


def build_random_model(
    config: Any, device: torch.device | str, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> torch.nn.Module:
    """A causal LM of ``config`` with random weights, made directly on ``device`` in ``dtype``.

    Weights: normal(0, 0.02) for matrices and embeddings, ones for norm weights, zeros for other
    vectors. Buffers (e.g. rotary frequencies, lost on the meta device) are copied from a
    layer-less twin built on the CPU. The model is returned frozen and in eval mode.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.to_empty(device=device)
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # shared (tied) parameters appear once
            if param.dim() >= 2:
                param.normal_(0.0, INIT_STD, generator=generator)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.zero_()
        _copy_buffers_from_twin(model, config)
    return model.eval().requires_grad_(False)


def _copy_buffers_from_twin(model: torch.nn.Module, config: Any) -> None:
    from transformers import AutoModelForCausalLM

    buffers = dict(model.named_buffers())
    if not buffers:
        return
    twin_config = copy.deepcopy(config)
    twin_config.vocab_size = 8
    for layers in (0, 1):  # zero layers where the architecture allows it, else one
        twin_config.num_hidden_layers = layers
        try:
            with torch.device("cpu"):
                twin = AutoModelForCausalLM.from_config(twin_config, dtype=torch.float32)
            break
        except Exception:  # an architecture that needs at least one layer
            if layers == 1:
                raise
    twin_buffers = dict(twin.named_buffers())
    missing = [name for name in buffers if name not in twin_buffers]
    if missing:
        raise RuntimeError(f"cannot rebuild buffers {missing} of a meta-initialised model")
    for name, buffer in buffers.items():
        buffer.copy_(twin_buffers[name].to(buffer.dtype))


def load_model(
    name: str, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.nn.Module, str]:
    """The named benchmark model and a short description of it.

    Args:
        name: a key of `MODEL_SHAPES` (random weights) or one of `PRETRAINED_MODELS`.

    Raises:
        ImportError, ValueError: if a pretrained model cannot be loaded here (callers skip it).
    """
    if name in MODEL_SHAPES:
        config = llama_config(name)
        model = build_random_model(config, device, dtype, seed)
        return model, f"random Llama {name}"
    if name == "smollm2-135m":
        from cpt.pretrained import load_model_and_tokenizer  # lazy: optional, may not exist yet

        model, _ = load_model_and_tokenizer(None, dtype=dtype, device=device)
        return model.requires_grad_(False), "SmolLM2-135M-Instruct"
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_SHAPES) + list(PRETRAINED_MODELS)}")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------- data


@dataclass
class SyntheticContext:
    """A CPT context of whole 32-token examples (the last one cut at N), with PEFT's field names."""

    token_ids: list[int]
    mask: list[int]
    type_codes: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def cpt_config(self, **kwargs: Any) -> Any:
        from cpt import CPTConfig

        return CPTConfig(
            cpt_token_ids=self.token_ids, cpt_mask=self.mask, cpt_tokens_type_mask=self.type_codes, **kwargs
        )

    def peft_config(self, **kwargs: Any) -> Any:
        import peft

        return peft.CPTConfig(
            task_type="CAUSAL_LM",
            cpt_token_ids=list(self.token_ids),
            cpt_mask=list(self.mask),
            cpt_tokens_type_mask=list(self.type_codes),
            **kwargs,
        )


def synthetic_context(num_tokens: int, vocab_size: int, seed: int = 0) -> SyntheticContext:
    """N context tokens: examples of `EXAMPLE_ROLES`, example k's non-zero codes shifted by 4k.

    Raises:
        ValueError: if N is too short to hold one label.
    """
    first_label = EXAMPLE_ROLES.index(4)
    if num_tokens <= first_label + 1:
        raise ValueError(f"a context needs more than {first_label + 1} tokens to hold a label, got {num_tokens}")
    codes: list[int] = []
    example = 0
    while len(codes) < num_tokens:
        codes += [r + CODES_PER_EXAMPLE * example if r else 0 for r in EXAMPLE_ROLES]
        example += 1
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_TOKEN_ID, vocab_size, (num_tokens,), generator=generator).tolist()
    return SyntheticContext(token_ids=ids, mask=[1] * num_tokens, type_codes=codes[:num_tokens])


def synthetic_batch(
    batch_size: int,
    vocab_size: int,
    device: torch.device | str,
    seed: int = 1,
    attention_mask: bool = False,
) -> dict[str, torch.Tensor | None]:
    """B samples of one 32-token example each, codes 0..4 unshifted (docs/method.md).

    Returns:
        ``input_ids`` (B, 32), ``labels`` (= input_ids), ``input_type_mask`` (B, 32) and
        ``attention_mask``: all ones if asked, else None (no padding: every sample is 32 tokens).
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_TOKEN_ID, vocab_size, (batch_size, EXAMPLE_LEN), generator=generator)
    codes = torch.tensor(EXAMPLE_ROLES, dtype=torch.long).expand(batch_size, -1).clone()
    mask = torch.ones_like(ids) if attention_mask else None
    return {
        "input_ids": ids.to(device),
        "attention_mask": None if mask is None else mask.to(device),
        "labels": ids.clone().to(device),
        "input_type_mask": codes.to(device),
    }


# ---------------------------------------------------------------------------------------- timing


@dataclass
class Measurement:
    """Median and minimum wall time of the timed calls, and the peak memory over all calls."""

    median_ms: float
    min_ms: float
    peak_gib: float | None
    steps: int

    def as_dict(self, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}_ms": round(self.median_ms, 3),
            f"{prefix}_min_ms": round(self.min_ms, 3),
            f"{prefix}_peak_gib": None if self.peak_gib is None else round(self.peak_gib, 3),
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device | None = None) -> None:
    """Collects garbage and returns cached blocks to the driver (after ``del`` of big objects)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated memory since the last reset, in GiB; None off CUDA (not tracked)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> Measurement:
    """Times ``fn``: ``warmup`` untimed calls, then ``steps`` calls each between two syncs.

    Peak memory covers warm-up and timed calls, measured from a fresh reset.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    free_memory(device)
    reset_peak_memory(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Measurement(
        median_ms=statistics.median(times) * 1e3,
        min_ms=min(times) * 1e3,
        peak_gib=peak_memory_gib(device),
        steps=steps,
    )


def is_out_of_memory(error: BaseException) -> bool:
    """True for the shapes an out-of-memory error takes (allocator, cuBLAS, cuDNN)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text


def guarded(fn: Callable[[], dict[str, Any]], prefix: str, device: torch.device) -> dict[str, Any]:
    """Runs ``fn``; on failure returns ``{prefix_status: "OOM" | "error", prefix_error: ...}``.

    Memory is freed after the exception (and the frames it holds) is gone.
    """
    status = error_text = None
    try:
        return fn()
    except Exception as error:  # a failed measurement must not end the run
        status = "OOM" if is_out_of_memory(error) else "error"
        error_text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    free_memory(device)
    return {f"{prefix}_status": status, f"{prefix}_error": error_text}


# ---------------------------------------------------------------------------------------- output


def environment(device: torch.device) -> dict[str, Any]:
    """Card name, library versions and date, for the head of a results file."""
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        device_name = f"{device_name} ({total:.0f} GiB)"
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device_name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "cuda": torch.version.cuda,
    }


def emit(record: dict[str, Any], stream: Any = None) -> None:
    """Prints one JSON line (the machine-readable result) and flushes."""
    print(json.dumps(record, default=str), file=stream or sys.stdout, flush=True)


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub markdown table of ``rows``; ``columns`` are (key, header) pairs. Missing -> blank."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2e}"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def append_text(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)


def finish(title: str, table: str, output: str | None) -> None:
    """Prints a benchmark's markdown table under its title, and appends both to ``output``."""
    text = f"{title}\n\n{table}"
    print("\n" + text, flush=True)
    if output:
        append_text(output, text + "\n")
