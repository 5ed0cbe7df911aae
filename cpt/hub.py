"""The Hugging Face hub: hub names resolved to local files, and adapters uploaded with a card.

A hub name is looked up in the local Hugging Face cache first, so a model or adapter used once
loads again without a network. Offline (``HF_HUB_OFFLINE=1``) an uncached name fails at once;
online, cpt asks the hub about the repository with a short timeout (`HUB_TIMEOUT_S`) before
downloading, so an unreachable hub is reported in seconds instead of after a minute of retries.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from cpt import _io
from cpt.config import ADAPTER_FILES, CPT_CONFIG_NAME, PEFT_CONFIG_NAME, AdapterFormat


class Uploadable(Protocol):
    """What `model_card` and `push_to_hub` read of a model (a `CPTModel`): this module sits below
    `cpt.model`, so that `CPTModel.push_to_hub` calls it without an import running upwards."""

    base_model: Any
    task: dict | None

    def context_embeddings(self) -> Any: ...  # (N, d): the card states N and d

    def save_pretrained(self, path: str | Path, format: AdapterFormat = "cpt") -> Path: ...


HUB_TIMEOUT_S = 5.0
"""Seconds the hub may take to answer cpt's first question about a repository."""

OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}

MODEL_CARD_NAME = "README.md"


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in OFFLINE_ENV_VARS)


def looks_like_hub_name(name: str) -> bool:
    """True for ``name`` or ``org/name`` without path syntax (what the hub accepts as a repo id)."""
    if not name or name.count("/") > 1 or "\\" in name or os.path.isabs(name):
        return False
    if name.startswith((".", "~")) or name.endswith("/"):
        return False
    return all(part and not part.startswith((".", "-")) for part in name.split("/"))


def is_cached(repo_id: str, filename: str, revision: str | None = None) -> bool:
    """True when ``filename`` of the hub repository is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # an invalid repo id or revision: not cached
        return False
    return isinstance(found, str)


def check_reachable(repo_id: str, *, revision: str | None = None, token: str | bool | None = None) -> None:
    """Asks the hub whether ``repo_id`` (at ``revision``) exists, waiting at most `HUB_TIMEOUT_S`.

    Raises:
        ValueError: offline, when the hub cannot be reached in time, or the repository or the
            revision does not exist (or is private and no token grants access); the message
            names the repository and says what to do.
    """
    where = repo_id if revision is None else f"{repo_id} (revision {revision})"
    if is_offline():
        raise ValueError(
            f"{where} is not in the local Hugging Face cache and the hub is off "
            f"({'/'.join(OFFLINE_ENV_VARS)} is set): download it once while online"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S, token=token)
    except (HFValidationError, ValueError) as err:
        raise ValueError(f"{repo_id!r} is not a valid hub name: {_first_line(err)}") from None
    except RevisionNotFoundError:
        raise ValueError(f"the hub has no revision {revision!r} of {repo_id}") from None
    except GatedRepoError:
        raise ValueError(f"{repo_id} is gated: accept its terms on the hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"the hub has no repository {repo_id} (or it is private: log in with hf auth login)"
        ) from None
    except Exception as err:  # connection refused, timeout, DNS, proxy: the hub is unreachable
        raise ValueError(
            f"{where} is not in the local Hugging Face cache and the hub "
            f"({_endpoint()}) did not answer within {HUB_TIMEOUT_S:g} s: {type(err).__name__}"
        ) from None


def adapter_folder(repo_id: str, *, revision: str | None = None, token: str | bool | None = None) -> Path:
    """The local folder of an adapter on the hub, from the cache or downloaded once.

    Only the adapter's files (`ADAPTER_FILES`) are fetched.

    Raises:
        ValueError: as `check_reachable`, or when the download fails.
    """
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = dict(revision=revision, allow_patterns=list(ADAPTER_FILES), token=token)
    if any(is_cached(repo_id, name, revision) for name in (CPT_CONFIG_NAME, PEFT_CONFIG_NAME)):
        try:
            return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        except Exception:  # an incomplete cache entry: download below
            pass
    check_reachable(repo_id, revision=revision, token=token)
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as err:
        raise ValueError(f"cannot download the adapter {repo_id}: {_first_line(err)}") from None


def model_card(model: Uploadable, *, base_model_name: str | None = None) -> str:
    """A model card (``README.md`` with YAML metadata) describing ``model``'s adapter."""
    num_tokens, hidden_size = model.context_embeddings().shape
    task = model.task or {}
    labels = task.get("labels")
    template = task.get("template") or {}
    base = base_model_name or getattr(getattr(model.base_model, "config", None), "_name_or_path", None)
    meta = ["---", "library_name: cpt", "tags:", "- cpt", "- prompt-tuning", "- few-shot-classification"]
    if base and looks_like_hub_name(str(base)):
        meta.append(f"base_model: {base}")
    meta.append("---")
    lines = [
        *meta,
        "",
        "# CPT adapter",
        "",
        "A [Context-aware Prompt Tuning](https://arxiv.org/abs/2410.17222) adapter made with the "
        "`cpt` library: a context of "
        f"{num_tokens} tokens whose embeddings were trained "
        f"(hidden size {hidden_size}).",
        "",
        f"- base model: `{base or 'not recorded'}`",
    ]
    if labels:
        lines.append(f"- labels: {', '.join(f'`{label}`' for label in labels)}")
    if template:
        lines.append(
            f"- template: input `{template.get('input_template')}`, output `{template.get('output_template')}`"
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from cpt import CPTModel, classify, load_model_and_tokenizer",
        "from cpt.workflow import labels_of, template_of",
        "",
        f"base_model, tokenizer = load_model_and_tokenizer({str(base)!r})" if base else
        "base_model, tokenizer = load_model_and_tokenizer(...)  # the base model it was trained on",
        "model = CPTModel.from_pretrained(base_model, \"<this repository>\")",
        "print(classify(model, tokenizer, [\"some text\"], labels_of(model), template=template_of(model)).predictions)",
        "```",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(
    model: Uploadable,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload CPT adapter",
    format: AdapterFormat = "cpt",
    base_model_name: str | None = None,
) -> str:
    """Uploads ``model``'s adapter and a model card to the hub repository ``repo_id``.

    The adapter is written with ``model.save_pretrained`` into a temporary folder, a
    ``README.md`` from `model_card` is added, the repository is created if needed, and the folder
    is uploaded as one commit.

    Args:
        model: the `CPTModel` whose adapter to upload.
        repo_id: ``org/name`` or ``name``.
        private: make a new repository private (None: the hub's default).
        token: a hub token; None uses the logged-in one.
        revision: the branch to commit to; None for the default branch.
        commit_message: the commit's message.
        format: the adapter's layout, ``"cpt"`` or ``"peft"``.
        base_model_name: the base model's hub name for the card; by default the one in the
            base model's config.

    Returns:
        The URL of the commit.

    Raises:
        ValueError: for a ``repo_id`` that is not a hub name, or a bad ``format``.
    """
    if not looks_like_hub_name(repo_id):
        raise ValueError(f"repo_id must be a hub name like 'org/name', got {repo_id!r}")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="cpt-push-") as tmp:
        folder = Path(tmp) / "adapter"
        model.save_pretrained(folder, format=format)
        (folder / MODEL_CARD_NAME).write_text(model_card(model, base_model_name=base_model_name))
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision
        )
    return str(getattr(commit, "commit_url", commit))


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__



def resolve_adapter(
    path: str | os.PathLike[str], *, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """The local folder of an adapter given as a folder or as a hub name.

    An existing folder, or anything that is not a hub name, is returned as it is (so a missing
    folder gets `cpt.adapter`'s own error); a hub name is resolved by `adapter_folder`.

    Raises:
        ValueError: for a hub name that is neither a local folder nor on the hub (or not
            reachable); the message names both.
    """
    local = Path(path).expanduser()
    name = os.fspath(path)
    if _io.entry_kind(local, "adapter") is not None or not looks_like_hub_name(name):
        return local
    try:
        return adapter_folder(name, revision=revision, token=token)
    except ValueError as err:
        raise ValueError(f"no adapter folder {name!r}, nor an adapter on the hub: {err}") from None
