"""One rank of the multi-process tests (tests/test_distributed.py), started by ``torchrun``.

Usage: ``torchrun --nproc_per_node 2 tests/distributed_worker.py OUT SCENARIO [SCENARIO ...]``.
Each scenario trains a tiny model on the CPU (gloo) and writes, per rank, the trained delta and
the losses under ``OUT/<scenario>/``; the test compares them with one process on the combined
batch. The shared setup (examples, context, configs) lives in tests/distributed_cases.py, which
the test imports too, so both sides train exactly the same problem.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)

import distributed_cases as cases  # noqa: E402

from cpt import distributed  # noqa: E402


def _write(out: Path, name: str, delta: torch.Tensor, losses: list[float]) -> None:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    rank = distributed.rank()
    torch.save(delta.detach().cpu().clone(), folder / f"delta.{rank}.pt")
    (folder / f"losses.{rank}.json").write_text(json.dumps(losses))


def command_alone(out: str) -> None:
    """`cpt eval` as ``torchrun ... -m cpt eval`` runs it: the command joins the group and leaves
    it; each rank writes the exit status and whether a group is left behind."""
    from cpt.cli import main as cli

    status = cli(cases.cli_eval_args(Path(out), Path(out) / "cli_one"))
    folder = Path(out) / "cli_alone"
    folder.mkdir(exist_ok=True)
    (folder / f"after.{os.environ['RANK']}.json").write_text(json.dumps([status, torch.distributed.is_initialized()]))


def main(out: str, scenarios: list[str]) -> None:
    if scenarios == ["cli_alone"]:
        command_alone(out)
        return
    distributed.init_from_env("cpu")
    root = Path(out)
    for name in scenarios:
        model, losses = cases.SCENARIOS[name](root)
        if model is not None:  # the command-line scenarios write their own files
            _write(root, name, model.delta, losses)
        distributed.barrier()
    gc.collect()  # the Trainer scenario's DDP wrapper, still holding the group, goes first
    distributed.leave()
    # Every result is on disk. Skipping the interpreter's teardown keeps torch's communication
    # threads from aborting the rank there (seen once in CI: "terminate called without an
    # active exception" after the last scenario), which would fail the launch after the work.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
