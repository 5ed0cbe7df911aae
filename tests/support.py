"""The releases the project declares it supports, read from pyproject.toml (one source of truth for
CI and the tests).

Usage: ``python3 tests/support.py oldest-transformers`` prints the oldest `transformers` release
that pyproject.toml admits, as ``X.Y.Z`` (what ``transformers.__version__`` reports for it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def lower_bound(package: str, pyproject: str | None = None) -> str:
    """The ``>=`` bound of ``package`` among pyproject.toml's dependencies, padded to ``X.Y.Z``.

    Raises:
        ValueError: if the dependency or its lower bound is missing.
    """
    text = PYPROJECT.read_text(encoding="utf-8") if pyproject is None else pyproject
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", text, flags=re.M | re.S)
    found = dependencies and re.search(rf'"{re.escape(package)}\s*[^"]*?>=\s*([0-9][0-9.]*)', dependencies.group(1))
    if not found:
        raise ValueError(f"pyproject.toml declares no lower bound for {package}")
    parts = found.group(1).split(".")
    return ".".join(parts + ["0"] * (3 - len(parts)))


if __name__ == "__main__":
    if sys.argv[1:] != ["oldest-transformers"]:
        sys.exit("usage: python3 tests/support.py oldest-transformers")
    print(lower_bound("transformers"))
