"""Hub names for adapters, `push_to_hub` (stopped at the upload call), and the conveniences
`CPTModel` offers PEFT users. Nothing touches a network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import HIDDEN, make_model
from tokenizers_util import make_bpe_tokenizer

from cpt import CPTModel, build_context, generate
from cpt.hub import looks_like_hub_name, model_card
from cpt.workflow import task_of, template_of

EXAMPLES = [("a fine story", "positive"), ("an awful film", "negative")]


@pytest.fixture
def tokenizer():  # type: ignore[no-untyped-def]
    return make_bpe_tokenizer()


@pytest.fixture
def model(tokenizer) -> CPTModel:
    from cpt.data import Template

    base = make_model("llama", vocab_size=len(tokenizer))
    base.config._name_or_path = "tiny-org/tiny-llama"
    cpt_model = CPTModel(base, build_context(tokenizer, EXAMPLES, opt_projection_epsilon=1.0))
    cpt_model.task = task_of(Template(), ["negative", "positive"])
    with torch.no_grad():
        cpt_model.delta.normal_(std=1e-3)
    cpt_model.project_()
    return cpt_model


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Hugging Face cache of our own, and the hub switched off."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# --- uploading -----------------------------------------------------------------------------------


class _Uploads:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch) -> _Uploads:
    """Patches huggingface_hub's repository and upload calls: they record and return."""
    from huggingface_hub import HfApi

    record = _Uploads()

    def create_repo(self, repo_id, **kwargs):  # type: ignore[no-untyped-def]
        record.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):  # type: ignore[no-untyped-def]
        record.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        record.files = {p.name: p.read_bytes() for p in folder.iterdir()}

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"

        return Commit()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return record


def test_push_to_hub_uploads_the_adapter_and_a_card(model: CPTModel, uploads: _Uploads, tmp_path: Path) -> None:
    url = model.push_to_hub("me/my-adapter", private=True, commit_message="first")
    assert url == "https://huggingface.co/me/my-adapter/commit/abc"
    assert [name for name, _ in uploads.calls] == ["create_repo", "upload_folder"]
    assert uploads.calls[0][1] == {"repo_id": "me/my-adapter", "private": True, "exist_ok": True}
    upload = uploads.calls[1][1]
    assert upload["repo_id"] == "me/my-adapter" and upload["commit_message"] == "first" and upload["revision"] is None
    assert sorted(uploads.files) == ["README.md", "cpt_adapter.safetensors", "cpt_config.json"]

    card = uploads.files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: cpt\n")
    assert "base_model: tiny-org/tiny-llama\n" in card
    assert f"a context of {model.num_virtual_tokens} tokens" in card and "`negative`, `positive`" in card

    saved = tmp_path / "uploaded"  # what was uploaded loads back as the same adapter
    saved.mkdir()
    for name, data in uploads.files.items():
        (saved / name).write_bytes(data)
    again = CPTModel.from_pretrained(model.base_model, saved)
    assert torch.equal(again.context_embeddings(), model.context_embeddings())
    assert again.task == model.task


def test_push_to_hub_in_peft_layout(model: CPTModel, uploads: _Uploads) -> None:
    model.push_to_hub("my-adapter", format="peft", base_model_name="org/base")
    assert sorted(uploads.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "base_model: org/base\n" in uploads.files["README.md"].decode()


@pytest.mark.parametrize("repo_id", ["", "/abs/path", "a/b/c", "./here", "org/"])
def test_push_to_hub_refuses_what_is_not_a_hub_name(model: CPTModel, uploads: _Uploads, repo_id: str) -> None:
    with pytest.raises(ValueError, match="repo_id must be a hub name"):
        model.push_to_hub(repo_id)
    assert uploads.calls == []


def test_model_card_without_task_or_hub_base(tokenizer) -> None:
    base = make_model("llama", vocab_size=len(tokenizer))
    base.config._name_or_path = "/some/local/folder"
    card = model_card(CPTModel(base, build_context(tokenizer, EXAMPLES)))
    assert "base_model:" not in card and "labels:" not in card
    assert "load_model_and_tokenizer('/some/local/folder')" in card


def test_hub_names() -> None:
    assert looks_like_hub_name("org/name") and looks_like_hub_name("name")
    for name in ("", "a/b/c", "/abs", "./rel", "~/x", "org/", "org/.hidden", "a\\b"):
        assert not looks_like_hub_name(name), name


# --- loading adapters by hub name ----------------------------------------------------------------


def test_from_pretrained_reads_a_hub_name_from_the_local_cache(
    model: CPTModel, offline: Path, tmp_path: Path
) -> None:
    folder = model.save_pretrained(tmp_path / "adapter")
    commit = "1" * 40
    repo = offline / "models--me--my-adapter"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)

    again = CPTModel.from_pretrained(model.base_model, "me/my-adapter")
    assert torch.equal(again.context_embeddings(), model.context_embeddings())
    assert again.task == model.task


def test_uncached_hub_adapter_offline_is_one_clear_error(model: CPTModel, offline: Path) -> None:
    with pytest.raises(ValueError) as info:
        CPTModel.from_pretrained(model.base_model, "me/not-cached")
    assert str(info.value) == (
        "no adapter folder 'me/not-cached', nor an adapter on the hub: me/not-cached is not in the "
        "local Hugging Face cache and the hub is off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set): "
        "download it once while online"
    )


def test_missing_local_folder_keeps_its_own_error(model: CPTModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no adapter folder"):
        CPTModel.from_pretrained(model.base_model, tmp_path / "nope")


# --- conveniences --------------------------------------------------------------------------------


def test_device_dtype_and_base_model(model: CPTModel) -> None:
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.get_base_model() is model.base_model
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.delta.dtype == torch.float32


def test_print_trainable_parameters(model: CPTModel, capsys) -> None:
    model.print_trainable_parameters()
    n = model.num_virtual_tokens * HIDDEN
    total = n + sum(p.numel() for p in model.base_model.parameters())
    assert capsys.readouterr().out == (
        f"trainable params: {n:,d} || all params: {total:,d} || trainable%: {100 * n / total:.4f}\n"
    )


def test_generate_is_the_cached_generate_with_the_models_template(model: CPTModel, tokenizer) -> None:
    texts = ["a fine story", "the plot was thin"]
    expected = generate(model, tokenizer, texts, template=template_of(model), max_new_tokens=4, do_sample=False)
    assert model.generate(tokenizer, texts, max_new_tokens=4, do_sample=False) == expected
