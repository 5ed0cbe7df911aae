"""The wheel users install: its name, files and metadata, built from this checkout.

The PyPI name `cpt` is another project's (Compact Prediction Tree), which also imports as `cpt`,
so the distribution is `context-prompt-tuning` while the package and the command stay `cpt`.
The wheel is built offline with the installed setuptools (``--no-build-isolation``), once per
module, from a copy of what it is made of; building it is marked slow.
"""

from __future__ import annotations

import configparser
import email
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import cpt
from cpt.cli import version_line

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
NAME = "context-prompt-tuning"
WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "cpt")
"""What the wheel is built from: the metadata, its long description, the license and the package."""


def _requirements(lines: list[str]) -> set[str]:
    return {str(Requirement(line)) for line in lines}


def test_the_distribution_is_not_named_like_the_package() -> None:
    assert PYPROJECT["project"]["name"] == NAME
    assert PYPROJECT["project"]["scripts"] == {"cpt": "cpt.cli:main"}
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["cpt*"]


def test_the_version_has_one_source() -> None:
    """pyproject.toml reads ``cpt.__version__``; ``cpt --version`` prints it; no other copy exists."""
    assert "version" not in PYPROJECT["project"] and PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cpt.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", cpt.__version__)
    assert version_line().startswith(f"cpt {cpt.__version__} (torch ")
    assignments = [path.name for path in (ROOT / "cpt").rglob("*.py") if "__version__ =" in path.read_text()]
    assert assignments == ["__init__.py"]


def test_nothing_looks_the_distribution_up_by_the_package_name() -> None:
    """A metadata look-up by the package's name would find the other project's, or nothing."""
    lookup = re.compile(r"""(version|distribution|metadata|files|requires)\(\s*["']cpt["']\s*\)""")
    assert lookup.search(f"importlib.metadata.version({'cpt'!r})")
    for path in [*(ROOT / "cpt").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        assert not lookup.search(path.read_text(encoding="utf-8")), path


def test_the_installed_metadata_is_this_package() -> None:
    """Where the distribution is installed (``pip install -e .``), its metadata matches the code."""
    try:
        installed = importlib.metadata.distribution(NAME)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{NAME} is not installed here (cpt is imported from a path)")
    assert installed.version == cpt.__version__
    scripts = installed.entry_points.select(group="console_scripts", name="cpt")
    assert [entry.value for entry in scripts] == ["cpt.cli:main"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """The wheel built from a copy of ``WHEEL_SOURCES`` (the checkout itself stays clean)."""
    setuptools = importlib.util.find_spec("setuptools")
    if setuptools is None:
        pytest.skip("building the wheel needs setuptools, the build backend, installed here")
    from setuptools import __version__ as installed

    (backend,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if Requirement(r).name == "setuptools"]
    if not backend.specifier.contains(installed):
        pytest.skip(f"building the wheel needs {backend}; setuptools {installed} is installed here")

    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)]
    built = subprocess.run(command, check=False, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    return wheel.read(f"context_prompt_tuning-{cpt.__version__}.dist-info/{name}").decode("utf-8")


def _metadata(wheel: zipfile.ZipFile) -> Message:
    return email.message_from_string(_dist_info(wheel, "METADATA"))


@pytest.mark.slow
def test_the_wheel_holds_the_package_its_marker_and_the_license(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "cpt").rglob("*.py")}
    assert modules <= names and "cpt/__init__.py" in modules
    assert {name for name in names if not name.startswith("context_prompt_tuning-")} == modules | {"cpt/py.typed"}
    license_file = f"context_prompt_tuning-{cpt.__version__}.dist-info/licenses/LICENSE"
    assert wheel.read(license_file) == (ROOT / "LICENSE").read_bytes()
    assert b"Apache License\n                           Version 2.0, January 2004" in wheel.read(license_file)


@pytest.mark.slow
def test_the_wheel_metadata(wheel: zipfile.ZipFile) -> None:
    metadata = _metadata(wheel)
    assert metadata["Name"] == NAME
    assert metadata["Version"] == cpt.__version__
    assert metadata["License-Expression"] == "Apache-2.0" and metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["Requires-Python"] == PYPROJECT["project"]["requires-python"]
    classifiers = metadata.get_all("Classifier")
    versions = [c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert versions == ["3.10", "3.11", "3.12", "3.13"]
    assert {"Typing :: Typed", "Operating System :: OS Independent"} <= set(classifiers)
    assert "Topic :: Scientific/Engineering :: Artificial Intelligence" in classifiers
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Issues"} <= set(urls)


@pytest.mark.slow
def test_the_wheel_requires_what_pyproject_declares(wheel: zipfile.ZipFile) -> None:
    project = PYPROJECT["project"]
    declared = set(project["dependencies"]) | {
        f'{line}; extra == "{extra}"' for extra, lines in project["optional-dependencies"].items() for line in lines
    }
    metadata = _metadata(wheel)
    assert _requirements(metadata.get_all("Requires-Dist")) == _requirements(list(declared))
    assert set(metadata.get_all("Provides-Extra")) == set(project["optional-dependencies"])


@pytest.mark.slow
def test_the_wheel_installs_the_cpt_command(wheel: zipfile.ZipFile) -> None:
    entry_points = configparser.ConfigParser()
    entry_points.read_string(_dist_info(wheel, "entry_points.txt"))
    assert dict(entry_points["console_scripts"]) == {"cpt": "cpt.cli:main"}
