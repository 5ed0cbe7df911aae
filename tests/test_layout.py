"""The package's layout: imports run one way, one module calls the base model, one decides the
path, one touches `transformers`' private attributes, `CPTModel` stays small, and every module
has its own test file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cpt"
MODULES = {f"cpt.{path.stem}": path for path in PACKAGE.glob("*.py") if path.stem != "__main__"}


def _imports(path: Path, type_checking: bool = False) -> set[str]:
    """The cpt modules ``path`` imports when it runs, at module level or inside functions, and
    with ``type_checking`` also those it imports for annotations only."""
    found = set()
    tree = ast.parse(path.read_text())
    for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]:
        if not type_checking:
            block.body = []  # annotations only: nothing imported when the module runs
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from cpt import loss
    return {name for name in found if name in MODULES and name != "cpt.__init__"}


def _cycles(type_checking: bool = False) -> list[list[str]]:
    graph = {name: _imports(path, type_checking) - {name} for name, path in MODULES.items() if name != "cpt.__init__"}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


@pytest.mark.parametrize("type_checking", [False, True], ids=["at run time", "for the type checker"])
def test_imports_run_one_way(type_checking: bool) -> None:
    assert _cycles(type_checking) == []


def test_the_cycle_finder_can_fail(tmp_path, monkeypatch) -> None:
    (tmp_path / "a.py").write_text("from cpt import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from cpt.a import x\n")
    monkeypatch.setattr("test_layout.MODULES", {"cpt.a": tmp_path / "a.py", "cpt.b": tmp_path / "b.py"})
    assert _cycles() == [["cpt.a", "cpt.b", "cpt.a"]]
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cpt.a import x\n")
    assert _cycles() == [] and _cycles(type_checking=True) == [["cpt.a", "cpt.b", "cpt.a"]]


def _calls_base_model(source: str) -> bool:
    return bool(re.search(r"\bbase_model\(|\bmodel\.generate\(|\bmodel\(\s*$|\bmodel\(inputs_embeds=", source, re.M))


def test_one_module_calls_the_base_model() -> None:
    callers = sorted(name for name, path in MODULES.items() if _calls_base_model(path.read_text()))
    assert callers == ["cpt.passes"]


def test_one_module_writes_private_transformers_attributes() -> None:
    pattern = re.compile(r"\._attn_implementation\w*\s*=(?!=)|_global_mapping|\.layers\[|DynamicCache\.update\(")
    writers = sorted(name for name, path in MODULES.items() if pattern.search(path.read_text()))
    assert writers == []  # and _compat.py itself uses the public setters and cache API


def test_one_function_decides_the_path() -> None:
    deciders = sorted(name for name, path in MODULES.items() if re.search(r"\bdef resolve\(", path.read_text()))
    assert deciders == ["cpt.plan"]
    for name, path in MODULES.items():  # the old deciders are gone
        old = r"_sharing_obstacle|_use_shared_attention|can_share_context|def obstacle\("
        assert not re.search(old, path.read_text()), name


def test_cpt_model_is_small() -> None:
    lines = (PACKAGE / "model.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("class CPTModel("))
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    assert end - start <= 250


def test_no_reference_to_documents_outside_the_repository() -> None:
    for name, path in MODULES.items():
        assert "SPEC \u00a7" not in path.read_text(), name


TESTS = Path(__file__).resolve().parent


def _modules_without_tests(tests: Path = TESTS) -> list[str]:
    """The modules of cpt without their own tests/test_<name>.py (a private module's without its
    underscore: cpt._io is tested in test_io.py)."""
    return sorted(
        name for name, path in MODULES.items()
        if name != "cpt.__init__" and not (tests / f"test_{path.stem.lstrip('_')}.py").is_file()
    )


def test_every_module_has_its_test_file() -> None:
    assert _modules_without_tests() == []


def test_the_test_file_check_can_fail(tmp_path, monkeypatch) -> None:
    package, tests = tmp_path / "cpt", tmp_path / "tests"
    package.mkdir()
    tests.mkdir()
    for name in ("__init__", "a", "_b"):
        (package / f"{name}.py").write_text("")
    monkeypatch.setattr("test_layout.MODULES", {f"cpt.{p.stem}": p for p in package.glob("*.py")})
    (tests / "test_a.py").write_text("")
    assert _modules_without_tests(tests) == ["cpt._b"]
    (tests / "test__b.py").write_text("")  # the underscore stays off the test's name
    assert _modules_without_tests(tests) == ["cpt._b"]
    (tests / "test_b.py").write_text("")
    assert _modules_without_tests(tests) == []


def test_the_layout_page_names_every_module() -> None:
    page = (PACKAGE.parent / "docs" / "layout.md").read_text()
    missing = [name for name in MODULES if name != "cpt.__init__" and f"`{name[4:]}`" not in page]
    assert missing == []
