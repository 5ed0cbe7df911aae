#!/usr/bin/env bash
# The whole GPU checklist in one command (under six minutes on one H100/H200, plus the tests):
#   bash benchmarks/run_gpu.sh [--tests] [--long] [--steps N] [--budget-s S]
# Writes benchmarks/RESULTS.md, and RESULTS.md, results.jsonl, run.log under $OUT if it is set.
set -u
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-$(command -v python || command -v python3)}"
exec "$PY" -m benchmarks.run_gpu "$@"
