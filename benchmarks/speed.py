"""How fast is a CPT train step and a CPT inference with `cpt`, against PEFT's CPT, and how much memory?

For each case (model, context length N, batch size B), in one process and on the same frozen
weights, the same context and the same batch:

- **train step**: forward + backward + AdamW step (+ ``project_()`` for `cpt`; PEFT projects
  lazily inside its next forward). `cpt` runs with ``context_sharing="auto"``. The loss of the
  first step (delta = 0 for both) is recorded for each side as a check that both compute the
  same function.
- **inference**: B queries of 32 tokens scored against the trained context. PEFT: one forward of
  its model, without labels, over ``[context ; queries]``. `cpt`: ``sample_logits`` with the
  context's KV cache built once (``build_context_cache``, timed apart).

One base model is built per model size and wrapped in turn by PEFT (``get_peft_model``, which
for prompt learning leaves the base model's modules untouched) and by `CPTModel`. An
out-of-memory error in any measurement is reported as ``"OOM"`` and the run goes on.

Output: one JSON line per case on stdout (``"bench": "speed"``), then a markdown table;
``--output FILE`` appends the table to FILE.

Examples::

    python -m benchmarks.speed --suite cpu --quick
    python -m benchmarks.speed --suite gpu --steps 5 --output results.md
    python -m benchmarks.speed --cases 8b:8192:8 --only cpt
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import (
    DTYPES,
    EXAMPLE_LEN,
    EXAMPLE_ROLES,
    MODEL_SHAPES,
    SyntheticContext,
    count_parameters,
    emit,
    environment,
    finish,
    free_memory,
    guarded,
    load_model,
    markdown_table,
    measure,
    synthetic_batch,
    synthetic_context,
)


@dataclass(frozen=True)
class Case:
    model: str
    num_tokens: int  # N, the context length
    batch_size: int  # B
    cpt_only: bool = False  # no PEFT side (e.g. lengths PEFT cannot hold in memory)
    checkpointing: bool = False  # needs activation checkpointing in CPTModel

    @property
    def name(self) -> str:
        return f"{self.model}:{self.num_tokens}:{self.batch_size}"


SUITES: dict[str, list[Case]] = {
    "gpu": [
        Case("1b", 512, 8),
        Case("1b", 512, 32),
        Case("1b", 2048, 8),
        Case("8b", 512, 8),
        Case("8b", 2048, 8),
        Case("8b", 8192, 8),
        Case("8b", 512, 1),
    ],
    "gpu-quick": [Case("1b", 512, 8), Case("1b", 512, 1)],
    "cpu": [
        Case("tiny", 256, 8),
        Case("tiny", 1024, 8),
        Case("tiny", 256, 1),
        Case("smollm2-135m", 256, 8),
    ],
    "cpu-quick": [Case("tiny", 64, 4), Case("tiny", 64, 1)],
}
LONG_CASE = Case("8b", 16384, 8, cpt_only=True, checkpointing=True)

# The targets set for these cases on an H200, bf16: (PEFT step ms, cpt step ms, PEFT infer ms, cpt cached infer ms).
TARGET_H200 = {
    "1b:512:8": (78, 85, 27, 15),
    "1b:512:32": (280, 58, 100, 14),
    "1b:2048:8": (273, 65, 98, 12),
    "8b:512:8": (312, 171, 132, 24),
    "8b:2048:8": (1171, 212, 506, 38),
    "8b:8192:8": (None, 784, 2200, 111),
    "8b:512:1": (72, 153, 23, 23),
}

TABLE_COLUMNS = [
    ("case", "model:N:B"),
    ("peft_train_ms", "PEFT step ms"),
    ("peft_train_peak_gib", "PEFT GiB"),
    ("cpt_train_ms", "cpt step ms"),
    ("cpt_train_peak_gib", "cpt GiB"),
    ("train_ratio", "step cpt/PEFT"),
    ("cpt_path", "cpt path"),
    ("cpt_graph_train_ms", "cpt graph step ms"),
    ("graph_train_ratio", "graph step cpt/PEFT"),
    ("peft_infer_ms", "PEFT infer ms"),
    ("cpt_cache_ms", "cpt cache build ms"),
    ("cpt_infer_ms", "cpt cached infer ms"),
    ("infer_ratio", "infer cpt/PEFT"),
    ("cpt_graph_infer_ms", "cpt graph infer ms"),
    ("graph_infer_ratio", "graph infer cpt/PEFT"),
    ("loss_rel_diff", "loss rel diff"),
    ("cpt_tflops", "cpt TFLOP/s"),
    ("target_h200", "target H200 (PEFT/cpt step; infer)"),
]


# ---------------------------------------------------------------------------------------- FLOPs


def cpt_step_flops(config: Any, context: SyntheticContext, batch_size: int, seq_len: int, shared: bool) -> float:
    """Useful FLOPs of one `cpt` train step: forward + input-gradient backward (weights frozen).

    Per layer, with q = heads * head_dim, kv = kv_heads * head_dim, f = intermediate size, and
    W = d*q + 2*d*kv + q*d + 3*d*f the matmul weights of one layer (L layers, P = L * W):

        forward  = 2 * P * T + 4 * L * q * A + 2 * d * V * R
        backward = 2 * P * T + 8 * L * q * A + 2 * d * V * R     (input gradients only)

    T = tokens run through the layers: N + B*S when the context is shared, B*(N+S) otherwise.
    A = causal (query, key) pairs: N(N+1)/2 + B*(S*N + S(S+1)/2) shared, B*(N+S)(N+S+1)/2 plain;
        attention forward is QK^T and PV (2 * 2q per pair), its backward dQ, dK, dV, dP (4 * 2q).
    R = positions whose vocabulary logits are computed (the loss targets), V the vocabulary.
    AdamW and the projection (O(N*d)) and flash attention's recomputation are not counted.
    """
    d = config.hidden_size
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    params = layers * (d * q + 2 * d * kv + q * d + 3 * d * config.intermediate_size)
    n, b, s = context.num_tokens, batch_size, seq_len
    codes = torch.tensor(context.type_codes)
    context_targets = int(((codes[1:] > 0) & (codes[1:] % 4 == 0)).sum())
    sample_targets = b * sum(1 for r in EXAMPLE_ROLES if r == 4)
    if shared:
        tokens = n + b * s
        pairs = n * (n + 1) / 2 + b * (s * n + s * (s + 1) / 2)
        logit_rows = context_targets + sample_targets
    else:
        tokens = b * (n + s)
        pairs = b * (n + s) * (n + s + 1) / 2
        logit_rows = b * context_targets + sample_targets
    forward = 2 * params * tokens + 4 * layers * q * pairs + 2 * d * config.vocab_size * logit_rows
    backward = 2 * params * tokens + 8 * layers * q * pairs + 2 * d * config.vocab_size * logit_rows
    return forward + backward


# ---------------------------------------------------------------------------------------- PEFT


def peft_measurements(
    model: torch.nn.Module, context: SyntheticContext, batch: dict, queries: dict, args: argparse.Namespace
) -> dict[str, Any]:
    """PEFT's train step and inference on ``model`` (wrapped by ``get_peft_model``, then dropped)."""
    import peft

    device = args.device
    peft_model = peft.get_peft_model(model, context.peft_config())
    try:
        out: dict[str, Any] = {}
        out.update(guarded(lambda: _peft_train(peft_model, batch, args), "peft_train", device))
        free_memory(device)
        out.update(guarded(lambda: _peft_infer(peft_model, queries, args), "peft_infer", device))
        return out
    finally:
        for param in peft_model.parameters():
            param.grad = None  # the wrapper goes out of scope here; the next measure() collects it


def _peft_train(peft_model: torch.nn.Module, batch: dict, args: argparse.Namespace) -> dict[str, Any]:
    def forward_backward() -> torch.Tensor:
        output = peft_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            input_type_mask=batch["input_type_mask"].clone(),  # PEFT shifts it in place
        )
        output.loss.backward()
        return output.loss

    params = [p for p in peft_model.parameters() if p.requires_grad]
    return timed_steps("peft_train", forward_backward, params, args)


def timed_steps(
    prefix: str,
    forward_backward: Callable[[], torch.Tensor],
    params: list[torch.nn.Parameter],
    args: argparse.Namespace,
    after_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Times train steps: ``forward_backward()`` (returns the loss), an AdamW step on ``params``,
    then ``after_step()``. Returns the timings under ``prefix`` and the first step's loss as
    ``<side>_loss`` (the prefix's first word)."""
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    losses: list[torch.Tensor] = []

    def step() -> None:
        loss = forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        if not losses:
            losses.append(loss.detach())

    try:
        result = measure(step, args.device, args.warmup, args.steps)
    finally:
        optimizer.zero_grad(set_to_none=True)  # its state goes with it on return
    return {**result.as_dict(prefix), f"{prefix.split('_')[0]}_loss": losses[0].item()}


def _peft_infer(peft_model: torch.nn.Module, queries: dict, args: argparse.Namespace) -> dict[str, Any]:
    def infer() -> None:
        with torch.no_grad():
            peft_model(input_ids=queries["input_ids"], attention_mask=queries["attention_mask"]).logits

    return measure(infer, args.device, args.warmup, args.steps).as_dict("peft_infer")


# ---------------------------------------------------------------------------------------- cpt


def checkpointing_argument() -> str | None:
    """The name of `CPTModel`'s activation-checkpointing argument, if it has one."""
    from cpt import CPTModel

    names = [n for n in inspect.signature(CPTModel.__init__).parameters if "checkpoint" in n]
    return names[0] if names else None


def cpt_measurements(
    model: torch.nn.Module,
    context: SyntheticContext,
    batch: dict,
    queries: dict,
    args: argparse.Namespace,
    checkpointing: bool = False,
) -> dict[str, Any]:
    """`cpt`'s train step and cached inference on ``model``."""
    from cpt import CPTModel

    device = args.device
    kwargs: dict[str, Any] = {"context_sharing": args.sharing, "compile_projection": args.compile_projection}
    if checkpointing:
        kwargs[checkpointing_argument()] = True
    cpt_model = CPTModel(model, context.cpt_config(), shared_attention=args.shared_attention, **kwargs)
    try:
        with torch.enable_grad():  # the plan of a training step
            how = cpt_model.execution_plan("loss", *batch["input_ids"].shape)
        shared, one_copy = how.shared, how.one_copy
        out: dict[str, Any] = {"cpt_path": ("shared, 1 copy" if one_copy else "shared") if shared else "plain"}
        cpu_batch = {k: None if v is None else v.cpu() for k, v in batch.items()}  # as train() passes it
        out.update(guarded(lambda: _cpt_train(cpt_model, cpu_batch, args), "cpt_train", device))
        free_memory(device)
        if args.graphs:
            out.update(guarded(lambda: _cpt_graph_train(cpt_model, cpu_batch, args), "cpt_graph_train", device))
            free_memory(device)
        out.update(guarded(lambda: _cpt_infer(cpt_model, queries, args), "cpt_infer", device))
        return out
    finally:
        cpt_model.delta.grad = None  # the wrapper goes out of scope here; the next measure() collects it


def _cpt_train(cpt_model: torch.nn.Module, batch: dict, args: argparse.Namespace) -> dict[str, Any]:
    def forward_backward() -> torch.Tensor:
        loss = cpt_model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["input_type_mask"]).loss
        loss.backward()
        return loss

    return timed_steps("cpt_train", forward_backward, cpt_model.trainable_parameters(), args, cpt_model.project_)


def _cpt_graph_train(cpt_model: torch.nn.Module, batch: dict, args: argparse.Namespace) -> dict[str, Any]:
    """The train step with forward and backward replayed from a CUDA graph (`cpt.graphs`)."""
    from cpt.graphs import GraphedLoss

    graphed = GraphedLoss(cpt_model)

    def forward_backward() -> torch.Tensor:
        return graphed(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["input_type_mask"])[0]

    params = cpt_model.trainable_parameters()
    result = timed_steps("cpt_graph_train", forward_backward, params, args, cpt_model.project_)
    if not graphed.enabled:
        return {"cpt_graph_train_status": "graphs off (see the warning)"}
    result.pop("cpt_loss")  # the eager step's is the one compared with PEFT's
    return {**result, "cpt_graph_captures": graphed.captures}


def _cpt_infer(cpt_model: torch.nn.Module, queries: dict, args: argparse.Namespace) -> dict[str, Any]:
    caches: list[Any] = []

    def build() -> None:
        caches.clear()  # never two caches alive at once
        caches.append(cpt_model.build_context_cache())

    out = measure(build, args.device, args.warmup, args.steps).as_dict("cpt_cache")
    cache = caches.pop()

    def infer() -> None:
        with torch.no_grad():
            cpt_model.sample_logits(queries["input_ids"], queries["attention_mask"], context_cache=cache)

    out.update(measure(infer, args.device, args.warmup, args.steps).as_dict("cpt_infer"))
    if args.graphs:
        out.update(guarded(lambda: _cpt_graph_infer(cpt_model, queries, cache, args), "cpt_graph_infer", args.device))
    return out


def _cpt_graph_infer(cpt_model: torch.nn.Module, queries: dict, cache: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Cached inference replayed from a CUDA graph (`cpt.graphs.GraphedLogits`)."""
    from cpt.graphs import GraphedLogits

    graphed = GraphedLogits(cpt_model, cache)
    out = measure(lambda: graphed(queries["input_ids"], queries["attention_mask"]), args.device, args.warmup, args.steps)
    if not graphed.enabled:
        return {"cpt_graph_infer_status": "graphs off (see the warning)"}
    return out.as_dict("cpt_graph_infer")


# ---------------------------------------------------------------------------------------- cases


def run_case(model: torch.nn.Module, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """All measurements of one case, as one flat record."""
    vocab_size = model.get_input_embeddings().weight.shape[0]
    record: dict[str, Any] = {
        "bench": "speed",
        "case": case.name,
        "model": case.model,
        "N": case.num_tokens,
        "B": case.batch_size,
        "S": EXAMPLE_LEN,
        "queries": args.queries or case.batch_size,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "steps": args.steps,
        "warmup": args.warmup,
    }
    context = synthetic_context(case.num_tokens, vocab_size, seed=args.seed)
    batch = synthetic_batch(case.batch_size, vocab_size, args.device, seed=args.seed + 1, attention_mask=args.attention_mask)
    queries = synthetic_batch(record["queries"], vocab_size, args.device, seed=args.seed + 2, attention_mask=args.attention_mask)

    if case.checkpointing and checkpointing_argument() is None:
        record["status"] = "skipped"
        record["reason"] = "CPTModel has no activation-checkpointing argument"
        return record

    if args.only in ("both", "peft") and not case.cpt_only:
        if importlib.util.find_spec("peft") is None:
            record["peft_train_status"] = record["peft_infer_status"] = "unavailable"
        else:
            measure_peft = functools.partial(peft_measurements, model, context, batch, queries, args)
            record.update(guarded(measure_peft, "peft", args.device))  # e.g. an older PEFT's API
    if args.only in ("both", "cpt"):
        measure_cpt = functools.partial(cpt_measurements, model, context, batch, queries, args, case.checkpointing)
        record.update(guarded(measure_cpt, "cpt", args.device))

    _derive(record, model, context, case)
    return record


def _derive(record: dict[str, Any], model: torch.nn.Module, context: SyntheticContext, case: Case) -> None:
    """Ratios, loss agreement, TFLOP/s and the H200 targets for the same case."""
    for kind in ("train", "infer"):
        peft_ms = record.get(f"peft_{kind}_ms")
        for prefix in ("", "graph_"):
            cpt_ms = record.get(f"cpt_{prefix}{kind}_ms")
            if isinstance(cpt_ms, float) and isinstance(peft_ms, float):
                record[f"{prefix}{kind}_ratio"] = round(cpt_ms / peft_ms, 3)
    if isinstance(record.get("peft_loss"), float) and isinstance(record.get("cpt_loss"), float):
        record["loss_rel_diff"] = abs(record["cpt_loss"] - record["peft_loss"]) / max(abs(record["peft_loss"]), 1e-12)
    cpt_ms = record.get("cpt_train_ms")
    config = getattr(model, "config", None)
    if isinstance(cpt_ms, float) and config is not None and hasattr(config, "intermediate_size"):
        flops = cpt_step_flops(config, context, case.batch_size, EXAMPLE_LEN, str(record.get("cpt_path")).startswith("shared"))
        record["cpt_step_tflop"] = float(f"{flops / 1e12:.4g}")
        record["cpt_tflops"] = float(f"{flops / (cpt_ms / 1e3) / 1e12:.4g}")
        graph_ms = record.get("cpt_graph_train_ms")
        if isinstance(graph_ms, float):
            shared = cpt_step_flops(config, context, case.batch_size, EXAMPLE_LEN, True)
            record["cpt_graph_tflops"] = float(f"{shared / (graph_ms / 1e3) / 1e12:.4g}")
    spec = TARGET_H200.get(case.name)
    if spec is not None:
        peft_step, cpt_step, peft_infer, cpt_infer = spec
        record["target_h200"] = f"{peft_step or 'OOM'}/{cpt_step}; {peft_infer}/{cpt_infer}"


def results_table(records: list[dict[str, Any]]) -> str:
    """The markdown table of speed records (cases with a ``case`` key)."""
    rows = []
    for record in records:
        row = dict(record)
        for side in ("peft", "cpt", "cpt_graph"):
            for kind in ("train", "infer"):
                status = record.get(f"{side}_{kind}_status") or record.get(f"{side.split('_')[0]}_status")
                if status is not None and not isinstance(record.get(f"{side}_{kind}_ms"), (int, float)):
                    row[f"{side}_{kind}_ms"] = status
        if record.get("status"):
            row["cpt_train_ms"] = f"{record['status']}: {record.get('reason', '')}"
        rows.append(row)
    return markdown_table(rows, TABLE_COLUMNS)


# ---------------------------------------------------------------------------------------- main


def parse_cases(text: str) -> list[Case]:
    """``"1b:512:8,8b:2048:8"`` -> cases; a trailing ``:cpt`` marks a cpt-only case."""
    cases = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "cpt"):
            raise argparse.ArgumentTypeError(f"a case is MODEL:N:B[:cpt], got {item!r}")
        num_tokens, batch_size = int(parts[1]), int(parts[2])
        long_case = parts[0] == LONG_CASE.model and num_tokens == LONG_CASE.num_tokens
        cases.append(Case(parts[0], num_tokens, batch_size, cpt_only=len(parts) == 4, checkpointing=long_case))
    return cases


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Cases of --suite gpu: " + ", ".join(c.name for c in SUITES["gpu"])
        + f"; --long adds {LONG_CASE.name} (cpt only, with activation checkpointing).",
    )
    parser.add_argument("--suite", choices=("gpu", "cpu"), default="gpu",
                        help="gpu: 1B and 8B Llama shapes in bf16 on CUDA; cpu: tiny models in float32 (default gpu)")
    parser.add_argument("--quick", action="store_true", help="a CI-size smoke: two small cases, 1 warm-up, 2 steps")
    parser.add_argument("--long", action="store_true", help=f"add {LONG_CASE.name}, cpt only (needs activation checkpointing)")
    parser.add_argument("--cases", type=parse_cases, default=None,
                        help="override the suite: comma-separated MODEL:N:B[:cpt], MODEL in "
                        f"{sorted(MODEL_SHAPES) + ['smollm2-135m']}")
    parser.add_argument("--only", choices=("both", "cpt", "peft"), default="both", help="which side to measure")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 5; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2; quick 1)")
    parser.add_argument("--queries", type=int, default=None, help="inference queries (default B: one per sample)")
    parser.add_argument("--device", default=None, help="torch device (default cuda for gpu, cpu for cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model dtype (default bf16 gpu, fp32 cpu)")
    parser.add_argument("--sharing", choices=("auto", "on", "off"), default="auto", help="cpt context_sharing")
    parser.add_argument("--shared-attention", choices=("auto", "on", "off"), default="auto",
                        help="samples attend to one copy of the context (cpt.attention): auto picks by size")
    parser.add_argument("--compile-projection", choices=("auto", "on", "off"), default="auto",
                        help="cpt compile_projection (auto: compiled on CUDA)")
    parser.add_argument("--graphs", choices=("auto", "on", "off"), default="auto",
                        help="also time cpt's step and inference replayed from CUDA graphs (cpt.graphs); "
                        "auto: on CUDA")
    parser.add_argument("--attention-mask", action="store_true",
                        help="pass all-ones attention masks (default: none, samples are unpadded)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="append the markdown table to this file")
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark; returns the records it printed."""
    args = build_parser().parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if args.suite == "gpu" else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--suite gpu needs CUDA; use --suite cpu here")
    dtype = DTYPES[args.dtype or ("bf16" if args.suite == "gpu" else "fp32")]
    if args.graphs == "on" and args.device.type != "cuda":
        raise SystemExit("--graphs on needs a CUDA device")
    args.graphs = args.graphs == "on" or (args.graphs == "auto" and args.device.type == "cuda")
    args.steps = args.steps or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    cases = args.cases or list(SUITES[args.suite + ("-quick" if args.quick else "")])
    if args.long and not args.cases and args.suite == "gpu":
        cases.append(LONG_CASE)

    env = environment(args.device)
    emit({"bench": "speed", "kind": "environment", **env})
    records: list[dict[str, Any]] = []
    for model_name in dict.fromkeys(case.model for case in cases):  # one base model per size, in order
        start = time.perf_counter()
        try:
            model, description = load_model(model_name, args.device, dtype, seed=args.seed)
        except Exception as error:  # e.g. the pretrained model or its loader is missing here
            for case in (c for c in cases if c.model == model_name):
                record = {"bench": "speed", "case": case.name, "model": case.model, "N": case.num_tokens,
                          "B": case.batch_size, "status": "skipped",
                          "reason": f"cannot load {model_name}: {type(error).__name__}: {error}"[:300]}
                emit(record)
                records.append(record)
            continue
        gc.freeze()  # later gc.collect() calls (after each measurement) skip the long-lived objects
        emit({"bench": "speed", "kind": "model", "model": model_name, "description": description,
              "parameters": count_parameters(model), "dtype": str(dtype).removeprefix("torch."),
              "build_s": round(time.perf_counter() - start, 2)})
        for case in (c for c in cases if c.model == model_name):
            try:
                record = run_case(model, case, args)
            except Exception as error:  # one broken case must not end the run
                record = {"bench": "speed", "case": case.name, "model": case.model, "N": case.num_tokens,
                          "B": case.batch_size, "status": "error", "reason": f"{type(error).__name__}: {error}"[:300]}
            free_memory(args.device)
            emit(record)
            records.append(record)
        del model
        gc.unfreeze()
        free_memory(args.device)

    title = f"### Speed ({env['device']}, steps={args.steps}, warm-up={args.warmup})"
    finish(title, results_table(records), args.output)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
