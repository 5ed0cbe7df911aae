"""The whole GPU benchmark table in one command, written to ``benchmarks/RESULTS.md``.

Runs `benchmarks.speed` once per model size (one base model per process) and
`benchmarks.projection`, each in its own subprocess with a time limit, so that a crash or a hang
in one case costs only that case: the remaining cases of the group are rerun in a fresh process.
The whole run is held to ``--budget-s`` seconds (default 330: under six minutes on one H100 or
H200). ``RESULTS.md`` (card, date, versions, tables) is rewritten after every group, so an
interrupted run still leaves what it measured. If ``$OUT`` is set, ``RESULTS.md``,
``results.jsonl`` (every JSON line) and ``run.log`` (everything printed) are also written there.

With ``--tests``, the project's test suite (all but the ``slow`` tests, which need the real
default model) runs first on the same card, in parallel where pytest-xdist is installed, and its
summary and failures head ``RESULTS.md``: the whole GPU checklist in one command.

Usage (from the repository root)::

    bash benchmarks/run_gpu.sh            # = python -m benchmarks.run_gpu
    bash benchmarks/run_gpu.sh --tests    # the test suite on the card, then the benchmarks
    python -m benchmarks.run_gpu --long   # adds 8B N=16384 B=8 (cpt only)
    python -m benchmarks.run_gpu --suite cpu --quick   # the driver's own smoke test, on CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import projection as projection_bench
from benchmarks import speed as speed_bench

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "benchmarks" / "RESULTS.md"
_SUMMARY = re.compile(r"\d+ (passed|failed|error)")  # pytest's closing line
MIN_RESTART_S = 45  # a fresh process needs imports, CUDA and a model before it measures anything


@dataclass
class Group:
    """One subprocess: a speed run over ``cases`` of one model, or the projection benchmark."""

    name: str
    args: list[str]
    cases: list[str] = field(default_factory=list)  # speed case names, for crash recovery
    time_cap_s: float = 240.0


def plan(args: argparse.Namespace) -> list[Group]:
    suite = args.suite + ("-quick" if args.quick else "")
    cases = list(speed_bench.SUITES[suite])
    if args.long and args.suite == "gpu":
        cases.append(speed_bench.LONG_CASE)
    common = ["--suite", args.suite]
    if args.steps:
        common += ["--steps", str(args.steps)]
    if args.warmup is not None:
        common += ["--warmup", str(args.warmup)]
    proj = ["-m", "benchmarks.projection"]
    if args.quick:
        proj.append("--quick")
    if args.suite == "cpu":
        proj += ["--device", "cpu", "--no-compile"]
    groups = [Group("projection", proj, [], 60.0)]  # first: short, and it has a target of its own
    for model in dict.fromkeys(c.model for c in cases):
        names = [c.name + (":cpt" if c.cpt_only else "") for c in cases if c.model == model]
        cap = 220.0 if model == "8b" else 150.0
        groups.append(Group(f"speed {model}", ["-m", "benchmarks.speed", *common], names, cap))
    return groups


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.perf_counter()
        self.records: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.log_lines: list[str] = []
        self.out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
        self.tests: dict[str, Any] | None = None

    def run_tests(self) -> None:
        """The test suite on this machine (``-m "not slow"``), before the benchmarks; its time
        does not count against ``--budget-s``."""
        argv = ["-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-rfE"]
        if importlib.util.find_spec("xdist") is not None:
            argv += ["-n", str(self.args.test_workers)]
        first = len(self.log_lines)
        started = time.perf_counter()
        rc, _ = self.run_process(argv, self.args.tests_s, "tests")
        lines = self.log_lines[first:]
        summary = next((line.strip("= ") for line in reversed(lines) if _SUMMARY.search(line)), "no summary line")
        failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
        self.tests = {"rc": rc, "summary": summary, "failed": failed, "wall_s": time.perf_counter() - started}
        if rc != 0:
            self.fail("tests", f"pytest exit status {rc}: {summary}")
        self.start = time.perf_counter()  # the benchmarks' budget starts now

    def remaining_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def run_group(self, group: Group) -> None:
        pending = list(group.cases)
        attempt = 0
        while True:
            limit = min(group.time_cap_s, self.remaining_s())
            if limit < (MIN_RESTART_S if attempt else 10):
                for case in pending or [group.name]:
                    self.fail(case, f"skipped: out of time budget ({self.args.budget_s:.0f} s)")
                return
            argv = list(group.args) + (["--cases", ",".join(pending)] if pending else [])
            rc, seen = self.run_process(argv, limit, group.name)
            if not group.cases:  # projection: no case bookkeeping
                if rc != 0:
                    self.fail(group.name, f"exit status {rc}")
                return
            pending = [c for c in pending if _case_key(c) not in seen]
            if rc == 0 or not pending:
                if rc != 0:
                    self.fail(group.name, f"exit status {rc} after its last case")
                return
            crashed = pending.pop(0)  # the case that was running when the process died
            reason = "timed out" if rc == "timeout" else f"process died (exit status {rc})"
            self.fail(crashed, reason)
            self.records.append({"bench": "speed", "case": _case_key(crashed), "status": "crashed", "reason": reason})
            if not pending:
                return
            attempt += 1

    def run_process(self, argv: list[str], limit_s: float, label: str) -> tuple[int | str, set[str]]:
        command = [sys.executable, *argv]
        self.log(f"# [{time.perf_counter() - self.start:6.1f} s] {label}: {' '.join(command[1:])} (limit {limit_s:.0f} s)")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True,
        )
        seen: set[str] = set()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                self.log(line.rstrip("\n"))
                record = _parse(line)
                if record is None:
                    continue
                self.records.append(record)
                if "case" in record:
                    seen.add(record["case"])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            rc: int | str = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # our own child's process group only
            process.wait()
            rc = "timeout"
        reader.join(timeout=10)
        return rc, seen

    def fail(self, what: str, reason: str) -> None:
        self.failures.append(f"{what}: {reason}")
        self.log(f"# FAILED {what}: {reason}")

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.log_lines.append(line)

    def write(self, final: bool = False) -> str:
        text = render(self.records, self.failures, time.perf_counter() - self.start, final, self.tests)
        if self.args.suite == "gpu":  # a CPU smoke test never replaces the GPU results
            RESULTS_PATH.write_text(text, encoding="utf-8")
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "RESULTS.md").write_text(text, encoding="utf-8")
            with open(self.out_dir / "results.jsonl", "w", encoding="utf-8") as handle:
                for record in self.records:
                    handle.write(json.dumps(record, default=str) + "\n")
            (self.out_dir / "run.log").write_text("\n".join(self.log_lines) + "\n", encoding="utf-8")
        return text


def _case_key(case: str) -> str:
    return case.removesuffix(":cpt")


def _parse(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith('{"bench"'):
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def render(
    records: list[dict[str, Any]], failures: list[str], elapsed_s: float, final: bool,
    tests: dict[str, Any] | None = None,
) -> str:
    """RESULTS.md: where and when, the test suite's result if it ran, then the speed and
    projection tables."""
    env = next((r for r in records if r.get("kind") == "environment"), {})
    models = [r for r in records if r.get("kind") == "model"]
    speed = [r for r in records if r.get("bench") == "speed" and "case" in r]
    proj = [r for r in records if r.get("bench") == "projection" and "method" in r]
    lines = [
        "# Benchmark results",
        "",
        f"- Card: {env.get('device', 'unknown')}",
        f"- Date: {env.get('date', 'unknown')}",
        f"- torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}, "
        f"Python {env.get('python')}, CUDA {env.get('cuda')}",
        f"- Command: `bash benchmarks/run_gpu.sh{' --tests' if tests is not None else ''}` (`python -m benchmarks.run_gpu`)"
        + ("" if final else " — partial, still running or interrupted"),
        f"- Wall time of the whole run: {elapsed_s:.0f} s",
    ]
    for model in models:
        lines.append(
            f"- Model {model['model']}: {model['description']}, {model['parameters'] / 1e9:.3f} B parameters, "
            f"{model['dtype']}, built in {model['build_s']} s"
        )
    if tests is not None:
        lines += [
            "",
            "## The test suite on this card",
            "",
            f"`python -m pytest -q -m \"not slow\"` (`--tests`), {tests['wall_s']:.0f} s: **{tests['summary']}**"
            f" (exit status {tests['rc']}).",
        ]
        lines += [""] + [f"- {line}" for line in tests["failed"]] if tests["failed"] else []
    lines += [
        "",
        "## Train step and inference (the target cases)",
        "",
        "Random Llama-shaped weights, context of N tokens made of 32-token examples, B samples of 32 tokens. "
        "Step = forward + backward + AdamW (+ `project_()` for cpt; PEFT projects inside its forward). "
        "Inference: B queries against the context (PEFT: one forward over [context; queries]; cpt: "
        "`sample_logits` with the KV cache built once, build time apart). Times are medians in ms; GiB is "
        "the peak of `torch.cuda.max_memory_allocated` (weights included). Loss rel diff: first-step loss of "
        "cpt vs PEFT on the same batch (delta = 0). cpt TFLOP/s counts forward + input-gradient backward "
        "(formula in `benchmarks/speed.py:cpt_step_flops`). cpt graph: the same step with forward and backward "
        "replayed from a CUDA graph (`cpt.graphs.GraphedLoss`, as `train` runs it on CUDA; the capture is a "
        "warm-up call), and inference replayed with `cpt.graphs.GraphedLogits`; \"graphs off\" means the "
        "capture's check against the eager pass refused it. The last column gives the H200 targets.",
        "",
        speed_bench.results_table(speed) if speed else "(no speed results)\n",
    ]
    big = next((r for r in speed if r.get("case") == "8b:8192:8" and r.get("cpt_tflops")), None)
    if big is not None:
        lines += [
            f"8B, N = 8192, B = 8: the cpt step does {big['cpt_step_tflop']} TFLOP of useful work in "
            f"{big['cpt_train_ms']} ms, {big['cpt_tflops']} TFLOP/s.",
            "",
        ]
    lines += ["## Projection (target on an H200: compiled 0.13 ms vs PEFT eager 0.66 ms)", ""]
    if proj:
        first = proj[0]
        lines += [f"N = {first['N']}, d = {first['d']}, {first['dtype']}, {first['device']}.", ""]
        lines.append(projection_bench.results_table(proj))
    else:
        lines.append("(no projection results)\n")
    errors = [f"{r.get('case') or r.get('method')}: {key.removesuffix('_error')}: {value}"
              for r in speed + proj for key, value in r.items() if key.endswith("_error") or key == "error"]
    errors += [f"{r['case']}: {r['status']}: {r.get('reason', '')}" for r in speed if r.get("status")]
    if failures or errors:
        lines += ["## Failures and errors", ""] + [f"- {f}" for f in failures + errors] + [""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run_gpu", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", choices=("gpu", "cpu"), default="gpu", help="cpu: a smoke test of the driver")
    parser.add_argument("--quick", action="store_true", help="the suites' quick cases")
    parser.add_argument("--long", action="store_true", help="add 8B N=16384 B=8 (cpt only, activation checkpointing)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (speed's default: 5)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (speed's default: 2)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="wall-time budget of the benchmarks (default 330)")
    parser.add_argument("--tests", action="store_true", help="run the test suite (not slow) first, on the same card")
    parser.add_argument("--tests-s", type=float, default=300.0, help="time limit of the test suite (default 300)")
    parser.add_argument("--test-workers", type=int, default=8, help="pytest-xdist workers, where it is installed (default 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runner = Runner(args)
    if args.tests:
        runner.run_tests()
        runner.write()
    for group in plan(args):
        runner.run_group(group)
        runner.write()
    text = runner.write(final=True)
    print("\n" + text, flush=True)
    where = [str(RESULTS_PATH)] if args.suite == "gpu" else []
    where += [str(runner.out_dir / "RESULTS.md")] if runner.out_dir else []
    print(f"# wrote {', '.join(where) or 'nothing (no $OUT, CPU smoke)'}", flush=True)
    return 1 if runner.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
