"""The README's two commands are what users run first: CI must run the same test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python3 -m pip")]


def test_readme_has_a_demo_and_a_test_command() -> None:
    commands = _commands()
    assert any(c.endswith("&& cpt demo") for c in commands)
    assert any(c.endswith("&& python3 -m pytest -q") for c in commands)


def test_ci_runs_the_readmes_test_command() -> None:
    test_command = next(c for c in _commands() if c.endswith("pytest -q"))
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_commands_pin_the_cpu_torch() -> None:
    for command in _commands():
        assert "torch==2.13.0" in command
