"""The README's two commands are what users run first: CI must run both, exactly as printed,
each in a new virtual environment, the demo first."""

import re
from pathlib import Path

import pytest
from support import lower_bound

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / ".ci" / "run"


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python3 -m pip")]


def _demo_and_test() -> tuple[str, str]:
    commands = _commands()
    demo = [c for c in commands if c.endswith("&& cpt demo")]
    test = [c for c in commands if c.endswith("&& python3 -m pytest -q")]
    assert len(demo) == 1 and len(test) == 1, commands
    return demo[0], test[0]


def test_readme_has_a_demo_and_a_test_command() -> None:
    demo, test = _demo_and_test()
    assert 'pip install -e ".[demo]"' in demo and 'pip install -e ".[test]"' in test


def test_ci_runs_both_commands_each_in_a_new_venv_demo_first() -> None:
    lines = CI.read_text().splitlines()
    positions = []
    for command in _demo_and_test():
        assert lines.count(command) == 1, command  # exactly as printed, once
        at = lines.index(command)
        # Its subshell: opened by "(", a fresh venv made and activated, the command last.
        opening = max(i for i in range(at) if lines[i] == "(")
        assert re.fullmatch(r"fresh_venv \w+", lines[opening + 1]), lines[opening + 1]
        assert lines[at + 1] == ")"
        positions.append(at)
    assert positions[0] < positions[1]  # the demo first
    names = [lines[lines.index(c) - 1].split()[1] for c in _demo_and_test()]
    assert len(set(names)) == 2  # two different environments


def test_ci_venvs_share_nothing_and_failures_fail() -> None:
    text = CI.read_text()
    assert "set -euo pipefail" in text.splitlines()[:10]
    body = text[text.index("fresh_venv() {") : text.index("\n}\n", text.index("fresh_venv() {"))]
    assert 'python3 -m venv "$work/$1"' in body and "--system-site-packages" not in text
    assert 'source "$work/$1/bin/activate"' in body and 'export CPT_HOME="$work/$1-cpt-home"' in body
    assert "export PIP_NO_CACHE_DIR=1" in text
    # the oldest transformers the project admits is tested too, read from pyproject.toml
    assert 'oldest="$(python3 tests/support.py oldest-transformers)"' in text
    assert 'pip install -q "transformers==$oldest"' in text


def test_the_oldest_transformers_comes_from_pyproject() -> None:
    assert re.fullmatch(r"5\.\d+\.\d+", lower_bound("transformers"))
    assert lower_bound("transformers", 'dependencies = [\n    "transformers>=5.17,<6",\n]\n') == "5.17.0"
    assert lower_bound("torch", 'dependencies = [\n    "torch>=2.4",\n]\n') == "2.4.0"
    with pytest.raises(ValueError, match="no lower bound for safetensors"):
        lower_bound("safetensors", 'dependencies = [\n    "safetensors",\n]\n')


def test_commands_pin_the_cpu_torch() -> None:
    for command in _commands():
        assert command.startswith("python3 -m pip install torch==2.13.0 && ")


def test_extras_declare_what_the_demo_needs() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    demo = re.search(r"^demo = \[(.*)\]$", pyproject, flags=re.MULTILINE).group(1)
    test = re.search(r"^test = \[(.*)\]$", pyproject, flags=re.MULTILINE).group(1)
    for needed in ('"gguf', '"accelerate'):  # transformers reads GGUF files with both
        assert needed in demo and needed in test
    assert "torch" not in demo + test  # nothing in the extras may move the pinned torch


_PIP_BY_NAME = re.compile(r"pip (?:install|show|uninstall|download)(?: -\S+)* ([A-Za-z0-9][\w.-]*)")
"""A pip command that names a distribution (not a folder such as ``.`` or ``".[test]"``)."""


def test_pages_name_the_distribution_not_the_package() -> None:
    """`cpt` on PyPI is another project: a page names it only to warn against it."""
    name = re.search(r'^name = "(.+)"$', (ROOT / "pyproject.toml").read_text(), flags=re.MULTILINE).group(1)
    install = (ROOT / "README.md").read_text().split("## Install\n", 1)[1].split("\n## ", 1)[0]
    assert f"`{name}`" in install and "import it as `cpt`" in install and "Never `pip install cpt`" in install
    assert _PIP_BY_NAME.findall("pip install -e . && pip show -v cpt") == ["cpt"]
    for page in [ROOT / "README.md", CI, *sorted((ROOT / "docs").glob("*.md"))]:
        text = " ".join(page.read_text().split())
        for match in _PIP_BY_NAME.finditer(text):
            if match.group(1) == "cpt":
                assert text[: match.start()].endswith("Never `"), f"{page.name}: {match.group(0)}"
