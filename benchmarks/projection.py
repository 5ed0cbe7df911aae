"""How fast is the projection of the CPT offsets onto their L2 balls?

Compares, on the same (N, d) offsets and radii:

- ``compiled``: `cpt.projection.project` under ``torch.compile(fullgraph=True, dynamic=False)``
  (one fused kernel; its compile time is reported apart, never in the timings);
- ``eager``: the same function without compile;
- ``cpt_inplace``: `cpt.projection.project_` as `CPTModel.project_` calls it after each step
  (compiled where asked, plus the copy back into the parameter);
- ``peft_masked``: PEFT's per-row masked version, re-implemented from its description: clone,
  row norms, boolean mask of non-zero rows, masked in-place scaling by eps / max(norm, eps);
- ``peft_module``: PEFT's own ``CPTEmbedding.get_projection()`` when PEFT is installed (it also
  rebuilds the radii from the config's Python lists on every call, as PEFT's forward does).

Each timing is the median over ``--repeats`` of the mean time of ``--iters`` back-to-back calls
between two device synchronisations. Every method's output is checked against ``eager``.

Output: one JSON line per method (``"bench": "projection"``), then a markdown table; ``--output
FILE`` appends the table to FILE.

Examples::

    python -m benchmarks.projection                      # N=8192, d=4096, float32, CUDA if present
    python -m benchmarks.projection --quick --no-compile  # CPU smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import (
    DTYPES,
    emit,
    environment,
    finish,
    markdown_table,
    synchronize,
    synthetic_context,
)

TABLE_COLUMNS = [
    ("method", "method"),
    ("ms", "ms per call"),
    ("min_ms", "min ms"),
    ("speedup_vs_eager", "speed-up vs eager"),
    ("compile_s", "compile s"),
    ("max_abs_diff", "max |diff| vs eager"),
]


def peft_masked_projection(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """PEFT's projection (``CPTEmbedding.get_projection``), written out with the radii given."""
    projected = delta.clone()
    norm = torch.norm(projected, p=2, dim=1)  # (N,)
    mask = norm > 0
    if torch.any(mask):  # a device-to-host sync, as in PEFT
        projected[mask] *= (eps[mask] / norm[mask].clamp(min=eps[mask])).view(-1, 1)
    return projected


def time_calls(fn: Callable[[], Any], device: torch.device, iters: int, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """(median, min) over ``repeats`` of the mean ms per call of ``iters`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3 / iters)
    return statistics.median(samples), min(samples)


def _inputs(n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Offsets of which about half the rows lie outside their ball, the radii, and the config."""
    from cpt.projection import epsilons

    config = synthetic_context(n, vocab_size=1000, seed=seed).cpt_config()
    eps = epsilons(config, d).to(device=device, dtype=dtype)  # (N,)
    generator = torch.Generator().manual_seed(seed)
    trainable_eps = torch.where(eps > 1e-6, eps, torch.full_like(eps, float(eps.max())))
    row_scale = trainable_eps.cpu() * (0.5 + torch.rand(n, generator=generator)) / d**0.5  # (N,)
    delta = torch.randn(n, d, generator=generator) * row_scale.unsqueeze(1)  # (N, d)
    return delta.to(device=device, dtype=dtype), eps, config


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from cpt.projection import project, project_

    device = args.device
    delta, eps, config = _inputs(args.n, args.d, args.dtype, device, args.seed)
    base = {"bench": "projection", "N": args.n, "d": args.d, "dtype": str(args.dtype).removeprefix("torch."),
            "device": str(device), "iters": args.iters, "repeats": args.repeats}
    reference = project(delta, eps)
    records: list[dict[str, Any]] = []

    def add(method: str, fn: Callable[[], torch.Tensor], **extra: Any) -> None:
        try:
            diff = float((fn() - reference).abs().max())
            ms, min_ms = time_calls(fn, device, args.iters, args.repeats)
        except Exception as error:  # e.g. no compiler: report and go on
            records.append({**base, "method": method, "status": "error",
                            "error": f"{type(error).__name__}: {error}"[:300], **extra})
            return
        records.append({**base, "method": method, "ms": round(ms, 5), "min_ms": round(min_ms, 5),
                        "max_abs_diff": diff, **extra})

    add("eager", lambda: project(delta, eps))
    if args.compile:
        compiled = torch.compile(project, fullgraph=True, dynamic=False)
        start = time.perf_counter()
        try:
            compiled(delta, eps)
            synchronize(device)
            compile_s: float | None = round(time.perf_counter() - start, 3)
        except Exception as error:  # compile unavailable here
            compile_s = None
            records.append({**base, "method": "compiled", "status": "error",
                            "error": f"{type(error).__name__}: {error}"[:300]})
        if compile_s is not None:
            add("compiled", lambda: compiled(delta, eps), compile_s=compile_s)
    work = delta.clone()

    def inplace() -> torch.Tensor:
        work.copy_(delta)  # the same input every call (one extra copy, also in the eager baseline below)
        project_(work, eps, compile=args.compile)
        return work

    add("cpt_inplace", inplace, compiled=bool(args.compile))
    add("peft_masked", lambda: peft_masked_projection(delta, eps))
    module = _peft_module(config, delta, device)
    if module is not None:
        add("peft_module", module.get_projection)

    eager_ms = next((r["ms"] for r in records if r["method"] == "eager" and "ms" in r), None)
    for record in records:
        if eager_ms and record.get("ms"):
            record["speedup_vs_eager"] = round(eager_ms / record["ms"], 2)
    return records


def _peft_module(config: Any, delta: torch.Tensor, device: torch.device) -> Any:
    """PEFT's ``CPTEmbedding`` holding ``delta``, or None without PEFT."""
    try:
        import peft
        from peft.tuners.cpt.model import CPTEmbedding
    except ImportError:
        return None
    peft_config = peft.CPTConfig(
        task_type="CAUSAL_LM",
        cpt_token_ids=config.cpt_token_ids,
        cpt_mask=config.cpt_mask,
        cpt_tokens_type_mask=config.cpt_tokens_type_mask,
    )
    peft_config.token_dim = delta.shape[1]
    word_embeddings = torch.nn.Embedding(max(config.cpt_token_ids) + 1, delta.shape[1]).to(device)
    module = CPTEmbedding(peft_config, word_embeddings).to(device)
    module.delta_embedding.weight.data = delta.clone().float()
    return module


def results_table(records: list[dict[str, Any]]) -> str:
    rows = [{**r, "ms": r.get("ms", r.get("status"))} for r in records]
    return markdown_table(rows, TABLE_COLUMNS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.projection",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=None, help="context rows N (default 8192; quick 256)")
    parser.add_argument("--d", type=int, default=None, help="hidden size d (default 4096; quick 64)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="offset dtype (default fp32, as in cpt)")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--iters", type=int, default=None, help="calls per timing sample (default 100; quick 5)")
    parser.add_argument("--repeats", type=int, default=None, help="timing samples (default 10; quick 3)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--quick", action="store_true", help="a CI-size smoke: N=256, d=64, few calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="append the markdown table to this file")
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark; returns the records it printed."""
    args = build_parser().parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = DTYPES[args.dtype]
    args.n = args.n or (256 if args.quick else 8192)
    args.d = args.d or (64 if args.quick else 4096)
    args.iters = args.iters or (5 if args.quick else 100)
    args.repeats = args.repeats or (3 if args.quick else 10)
    env = environment(args.device)
    emit({"bench": "projection", "kind": "environment", **env})
    records = run(args)
    for record in records:
        emit(record)
    title = f"### Projection (N={args.n}, d={args.d}, {str(args.dtype).removeprefix('torch.')}, {env['device']})"
    finish(title, results_table(records), args.output)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
