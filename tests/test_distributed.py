"""Tests of cpt/distributed.py: two processes (gloo, CPU) against one process on the combined batch.

One ``torchrun`` launch runs every scenario of tests/distributed_cases.py (data-parallel
`cpt.train` with unequal label counts per rank and gradient accumulation, resume across process
counts, FSDP2-sharded layers, `CPTTrainer` under DDP, `cpt train` and `cpt eval`); each test then
compares what the ranks wrote with a single-process run here, in float32, and prints the largest
difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import distributed_cases as cases
import pytest
import torch

from cpt import distributed
from cpt.checkpoint import LAST_CHECKPOINT_NAME, STATE_JSON_NAME

TOLERANCE = 1e-6
"""float32: the ranks sum partial gradients in another order than one process does."""

LAUNCH_TIMEOUT = 420
"""Seconds for the launch of all scenarios (tiny models; most of it is importing)."""

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """Runs every scenario on 2 ranks; returns the folder the ranks wrote into."""
    root = tmp_path_factory.mktemp("distributed")
    cases.run_train(cases.HALF_STEPS, checkpoint_dir=root / "single_half")  # resumed by 2 ranks
    cases.prepare_cli(root)
    from cpt.cli import main

    assert main(cases.cli_train_args(root, root / "cli_one")) == 0  # evaluated by 2 ranks
    _launch(root, *cases.SCENARIOS)
    _launch(root, "cli_alone")  # no group made by the worker: the command joins one and leaves it
    return root


def _launch(root: Path, *scenarios: str) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "distributed_worker.py"), str(root), *scenarios,
    ]
    # The ranks train on the CPU (gloo), as the single-process references here do: hiding the GPUs
    # keeps `Trainer` and FSDP2 off them too (on one GPU, rank 1 would ask for cuda:1).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def reference() -> tuple[torch.Tensor, list[float]]:
    """One process, whole batches: the run every data-parallel run must reproduce."""
    model, losses = cases.run_train()
    return model.delta.detach().clone(), losses


def ranks_result(root: Path, scenario: str) -> tuple[torch.Tensor, list[float]]:
    """Rank 0's delta and losses, after checking rank 1 ended with the very same ones."""
    folder = root / scenario
    deltas = [torch.load(folder / f"delta.{r}.pt") for r in range(2)]
    losses = [json.loads((folder / f"losses.{r}.json").read_text()) for r in range(2)]
    assert torch.equal(deltas[0], deltas[1]), f"{scenario}: the ranks' deltas differ"
    assert losses[0] == losses[1]
    return deltas[0], losses[0]


def assert_matches(name: str, delta: torch.Tensor, losses: list[float], expected: tuple) -> None:
    expected_delta, expected_losses = expected
    assert float(expected_delta.abs().max()) > 1e-3  # training moved the context
    difference = float((delta - expected_delta).abs().max())
    loss_difference = max(abs(a - b) for a, b in zip(losses, expected_losses))
    print(f"\n{name}: max |delta - single process| = {difference:.3g}, max loss difference = {loss_difference:.3g}")
    assert len(losses) == len(expected_losses)
    assert difference <= TOLERANCE
    assert loss_difference <= 1e-5


# ---------------------------------------------------------------------- pure functions


def test_share_splits_contiguously_and_gather_inverts_it() -> None:
    items = list(range(7))
    shares = [distributed.share(items, 3, r) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert distributed.share([1], 2, 1) == []
    assert distributed.gather(items) == items  # one process: itself
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()


def test_a_rank_without_a_gpu_of_its_own_is_refused_before_anything_starts(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))  # one past the last GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK \d+ but the machine has \d+ CUDA device"):
        distributed.init_from_env("cuda")
    assert not torch.distributed.is_initialized()


def test_shard_base_model_needs_a_process_group() -> None:
    with pytest.raises(ValueError, match="process group"):
        distributed.shard_base_model(cases.fresh_model())


def test_sharded_model_refuses_cuda_graphs_and_trains_alone(tmp_path) -> None:
    """A group of one: sharding works, CUDA graphs are refused with the reason, training runs."""
    import torch.distributed as dist

    from cpt.train import train

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = cases.fresh_model()
        assert distributed.shard_base_model(model) == 2
        sharded_weight = next(model.base_model.model.layers[0].parameters())
        assert sharded_weight.device_mesh.device_type == "cpu"  # the model's device, not the machine's GPU
        assert distributed.is_sharded(model) and model.context_sharing == "auto"  # the option is the user's
        assert model.execution_plan("loss", 1, 4).shared  # the plan shares even one sample: every rank alike
        tok = cases.tokenizer()
        dataset, collator = cases.CPTDataset(tok, cases.TRAINING), cases.CPTCollator(tok.pad_token_id)
        with pytest.raises(ValueError, match="sharded with FSDP2"):
            train(model, dataset, cases.train_config(cuda_graphs="on"), collator=collator)
        sharded = train(model, dataset, cases.train_config(), collator=collator)
    finally:
        dist.destroy_process_group()
    _, expected_losses = cases.run_train()
    assert max(abs(a - b) for a, b in zip(sharded.losses, expected_losses)) <= 1e-5


# ---------------------------------------------------------------------- two processes


def test_data_parallel_train_matches_one_process(launched, reference) -> None:
    delta, losses = ranks_result(launched, "ddp")
    assert_matches("DDP cpt.train (batch 3 as 2+1, accumulation 2)", delta, losses, reference)
    checkpoint = launched / "ddp_checkpoints" / LAST_CHECKPOINT_NAME
    assert json.loads((checkpoint / STATE_JSON_NAME).read_text())["step"] == cases.TOTAL_STEPS
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [LAST_CHECKPOINT_NAME]  # no leftovers


def test_two_processes_resume_a_one_process_checkpoint(launched, reference) -> None:
    delta, losses = ranks_result(launched, "ddp_resume")
    assert_matches("1 process -> resumed on 2", delta, losses, reference)


def test_one_process_resumes_a_two_process_checkpoint(launched, reference) -> None:
    model, losses = cases.run_train(resume_from=launched / "ddp_half" / LAST_CHECKPOINT_NAME)
    assert_matches("2 processes -> resumed on 1", model.delta.detach(), losses, reference)


def test_fsdp2_sharded_layers_match_one_process(launched, reference) -> None:
    delta, losses = ranks_result(launched, "fsdp")
    assert_matches("FSDP2 cpt.train", delta, losses, reference)


def test_trainer_under_ddp_matches_one_process(launched, tmp_path) -> None:
    model, losses = cases.run_trainer(tmp_path, batch_size=4)
    delta, ddp_losses = ranks_result(launched, "trainer_ddp")
    assert_matches("CPTTrainer DDP (2 x 2 vs 4)", delta, ddp_losses, (model.delta.detach(), losses))


def test_ranks_that_disagree_are_refused_on_every_rank(launched) -> None:
    errors = [(launched / "disagree" / f"error.{r}.txt").read_text() for r in range(2)]
    assert errors[0] == errors[1]
    assert errors[0] == "the ranks disagree on what to train: config.learning_rate is [0.01, 0.02] on ranks 0..1"


# ---------------------------------------------------------------------- the command line


def test_cpt_train_and_eval_on_two_processes_match_one(launched, capsys) -> None:
    """`cpt train` / `cpt eval` as `torchrun -m cpt ...` runs them (the ranks call `cpt.cli.main`)."""
    from cpt.cli import main
    from cpt.model import CPTModel
    from cpt.pretrained import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(str(launched / "cli_model"), device="cpu")
    one = CPTModel.from_pretrained(base, launched / "cli_one")
    two = CPTModel.from_pretrained(base, launched / "cli_two")
    difference = float((one.delta - two.delta).detach().abs().max())
    with capsys.disabled():
        print(f"\ncpt train on 2 processes: max |delta - single process| = {difference:.3g}")
    assert float(one.delta.detach().abs().max()) > 1e-3
    assert difference <= TOLERANCE

    printed = [(launched / "cli_eval" / f"stdout.{r}.txt").read_text() for r in range(2)]
    assert printed[1] == ""  # rank 0 alone prints
    two_ranks = json.loads(printed[0].strip().splitlines()[-1])
    capsys.readouterr()
    assert main(cases.cli_eval_args(launched, launched / "cli_one")) == 0
    one_rank = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert two_ranks["examples"] == one_rank["examples"] == 7
    assert two_ranks["accuracy"] == one_rank["accuracy"]


# ---------------------------------------------------------------------- models spread by device_map


def test_classify_and_generate_over_a_device_map_with_offloaded_layers(tmp_path) -> None:
    """A model that `accelerate` dispatched (here one layer offloaded to disk, the CPU's stand-in
    for a second device) gives the same probabilities and text as the model in one piece."""
    from tiny_models import make_model
    from tokenizers_util import make_bpe_tokenizer
    from transformers import AutoModelForCausalLM

    from cpt.data import Example, build_context
    from cpt.infer import classify, generate
    from cpt.model import CPTModel

    tokenizer = make_bpe_tokenizer()
    make_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    examples = [Example("the movie was great", "positive"), Example("an awful film", "negative")]
    context = build_context(tokenizer, examples)
    whole = CPTModel(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), context)
    with torch.no_grad():
        whole.delta.add_(1e-3)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    dispatched = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert dispatched.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # really offloaded
    spread = CPTModel(dispatched, context)
    spread.load_state_dict(whole.state_dict())

    texts, labels = ["a fine story", "boring and too long"], ["positive", "negative"]
    expected = classify(whole, tokenizer, texts, labels)
    got = classify(spread, tokenizer, texts, labels)
    assert got.predictions == expected.predictions
    torch.testing.assert_close(got.probabilities, expected.probabilities, rtol=0, atol=1e-6)
    assert generate(spread, tokenizer, texts, max_new_tokens=3) == generate(whole, tokenizer, texts, max_new_tokens=3)


def test_a_command_under_torchrun_leaves_the_group_it_joined(launched) -> None:
    """`cpt eval` on 2 ranks joins the group itself and destroys it when done: a group left alive
    at exit can abort a rank from gloo's threads after the work succeeded."""
    after = [json.loads((launched / "cli_alone" / f"after.{r}.json").read_text()) for r in range(2)]
    assert after == [[0, False], [0, False]]  # exit status 0, no group left
