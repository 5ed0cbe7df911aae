"""Atomic file writes: a temporary name in the same folder, flushed, then renamed into place.

A crash (or a full disk) while writing leaves the previous file, or none, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically; creates the parent folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """Reads a JSON object from ``path``.

    Raises:
        ValueError: ``cannot read <what> <path>: ...`` or ``<what> <path> does not hold a JSON
            object``.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {what} {path}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} does not hold a JSON object")
    return data


def read_file_bytes(path: str | Path, what: str) -> bytes:
    """The bytes of ``path``; ``ValueError: <what> missing: <path>`` if it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} missing: {path}")
    return path.read_bytes()


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    """Saves tensors as safetensors atomically; returns the bytes written (for checksums)."""
    data = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    return data
