import json

import pytest
import torch
from contexts import context_config, sample_batch
from safetensors.torch import load_file, save_file
from tiny_models import make_model

from cpt import CPTModel, adapter_format
from cpt.adapter import CPT_CONFIG_NAME, CPT_WEIGHTS_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME


@pytest.fixture
def trained() -> CPTModel:
    model = CPTModel(make_model("llama"), context_config(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.9))
    with torch.no_grad():
        model.delta.normal_(0, 0.05)
    model.project_()
    return model


def test_cpt_layout_keeps_base_and_delta_apart(trained: CPTModel, tmp_path) -> None:
    trained.save_pretrained(tmp_path)
    assert adapter_format(tmp_path) == "cpt"
    tensors = load_file(tmp_path / CPT_WEIGHTS_NAME)
    assert set(tensors) == {"base", "delta"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    loaded = CPTModel.from_pretrained(make_model("llama"), tmp_path)
    assert torch.equal(loaded.base, trained.base) and torch.equal(loaded.delta, trained.delta)
    assert loaded.config == trained.config
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_peft_layout_holds_one_prompt_embeddings_tensor(trained: CPTModel, tmp_path) -> None:
    trained.save_pretrained(tmp_path, format="peft")
    assert adapter_format(tmp_path) == "peft"
    tensors = load_file(tmp_path / PEFT_WEIGHTS_NAME)
    assert list(tensors) == ["prompt_embeddings"]
    assert torch.equal(tensors["prompt_embeddings"], trained.context_embeddings().detach())
    config = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    assert config["peft_type"] == "CPT" and config["task_type"] == "CAUSAL_LM"
    assert config["token_dim"] == 32 and config["num_virtual_tokens"] == trained.num_virtual_tokens


def test_save_projects_first(trained: CPTModel, tmp_path) -> None:
    with torch.no_grad():
        trained.delta.mul_(100.0)  # as after an optimizer step, before project_()
    trained.save_pretrained(tmp_path)
    delta = load_file(tmp_path / CPT_WEIGHTS_NAME)["delta"]
    assert torch.all(delta.norm(dim=1) <= trained.epsilon * (1 + 1e-5))


def test_resumed_training_from_cpt_layout_is_exact(trained: CPTModel, tmp_path) -> None:
    trained.save_pretrained(tmp_path)
    loaded = CPTModel.from_pretrained(make_model("llama"), tmp_path)
    batch = sample_batch(2)
    for model in (trained, loaded):
        model.delta.grad = None
        model(**batch).loss.backward()
    assert torch.equal(trained.delta.grad, loaded.delta.grad)


def test_missing_and_foreign_folders(tmp_path) -> None:
    with pytest.raises(ValueError, match="no adapter folder at"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no adapter"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)


def test_mismatched_model_is_named(trained: CPTModel, tmp_path) -> None:
    trained.save_pretrained(tmp_path / "cpt")
    trained.save_pretrained(tmp_path / "peft", format="peft")
    import transformers

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4)
    other = transformers.LlamaForCausalLM(config)
    for fmt in ("cpt", "peft"):
        with pytest.raises(ValueError, match="for hidden size 32, but the model's is 64"):
            CPTModel.from_pretrained(other, tmp_path / fmt)
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="field 'vocab_size' is 96: the adapter is for vocabulary size 96, but the model's is 20"):
        CPTModel.from_pretrained(small, tmp_path / "cpt")
    with pytest.raises(ValueError, match="outside the model's vocabulary of 20"):
        CPTModel.from_pretrained(small, tmp_path / "peft")


def test_files_from_two_saves_are_detected(trained: CPTModel, tmp_path) -> None:
    trained.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        trained.delta.mul_(0.5)
    trained.save_pretrained(tmp_path / "b")
    (tmp_path / "a" / CPT_WEIGHTS_NAME).write_bytes((tmp_path / "b" / CPT_WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="checksum differs"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path / "a")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / CPT_CONFIG_NAME).write_text("{not json"), "cannot read adapter config"),
        (lambda d: (d / CPT_CONFIG_NAME).write_text("[1, 2]"), "does not hold a JSON object"),
        (lambda d: (d / CPT_WEIGHTS_NAME).unlink(), "adapter weights missing"),
    ],
)
def test_damaged_cpt_folders_are_named(trained: CPTModel, tmp_path, damage, message: str) -> None:
    trained.save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)


def test_damaged_peft_folders_are_named(trained: CPTModel, tmp_path) -> None:
    trained.save_pretrained(tmp_path, format="peft")
    (tmp_path / PEFT_WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)
    save_file({"other": torch.zeros(2, 2)}, tmp_path / PEFT_WEIGHTS_NAME)
    with pytest.raises(ValueError, match="has no tensor 'prompt_embeddings'"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)
    save_file({"prompt_embeddings": torch.zeros(3, 32)}, tmp_path / PEFT_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"has shape \(3, 32\), expected \(20, 32\)"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)
    config = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    config["peft_type"] = "LORA"
    (tmp_path / PEFT_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="field 'peft_type' must be \"CPT\", got 'LORA'"):
        CPTModel.from_pretrained(make_model("llama"), tmp_path)


def test_a_failed_write_leaves_the_previous_adapter(trained: CPTModel, tmp_path, monkeypatch) -> None:
    trained.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import cpt._io

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cpt._io.os, "fsync", explode)
    with torch.no_grad():
        trained.delta.mul_(0.5)
    with pytest.raises(OSError, match="disk full"):
        trained.save_pretrained(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no temporary file left, nothing half-written
    CPTModel.from_pretrained(make_model("llama"), tmp_path)


def test_saving_onto_a_file_is_refused(trained: CPTModel, tmp_path) -> None:
    target = tmp_path / "file"
    target.write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        trained.save_pretrained(target)
    assert target.read_text() == "mine"
