"""Every ```python block of docs/*.md and README.md runs: the docs cannot drift from the code.

The blocks of one page run in order in one fresh namespace (a page may build on its earlier
blocks) with nothing injected: a page that needs a model loads one itself, with
`cpt.load_model_and_tokenizer()`. The tests point ``$CPT_MODEL`` (the model that call loads by
default) at a tiny random Llama with an offline BPE tokenizer saved in a temporary folder, so a
page shows the real call and still runs in seconds. Blocks run in a temporary working folder. A
block preceded by the line ``<!-- no-test -->`` is not run (kept for the few that need a GPU or a
real download); a block that imports ``peft`` is skipped when PEFT is not installed, and a page
whose block loads a data set (`cpt.labelled_data`, from the StaICC package) is skipped from that block on
when StaICC is not installed (the README installs it; a GPU machine may not have it).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from tiny_models import make_model
from tokenizers_util import make_bpe_tokenizer


DOCS = Path(__file__).resolve().parents[1] / "docs"
NO_TEST = "<!-- no-test -->"
TINY_MAX_POSITIONS = 4096  # rotary positions: any length works, the limit is only checked
MAX_NO_TEST_BLOCKS = 3  # "sparingly": more than this and the docs are no longer tested
EXPECTED_PAGES = (
    "index.md", "quickstart.md", "method.md", "api.md", "cli.md", "adapters.md", "tuning.md",
    "performance.md", "accuracy.md", "limitations.md",
)

_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line, code, runs)`` of every ```python block; ``runs`` is False after ``<!-- no-test -->``."""
    blocks = []
    for match in _BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        runs = not (before and before[-1].strip() == NO_TEST)
        line = text.count("\n", 0, match.start()) + 2  # 1-based line of the block's first code line
        blocks.append((line, match.group(1), runs))
    return blocks


def _pages() -> list[Path]:
    """The docs pages and the README (whose first Python block is the workflow users copy)."""
    return sorted(DOCS.glob("*.md")) + [DOCS.parent / "README.md"]


def test_every_page_exists() -> None:
    missing = [name for name in EXPECTED_PAGES if not (DOCS / name).is_file()]
    assert missing == []


def test_python_blocks_are_found_and_few_are_skipped() -> None:
    blocks = [b for page in _pages() for b in python_blocks(page.read_text())]
    assert sum(runs for _, _, runs in blocks) >= 10
    assert sum(not runs for _, _, runs in blocks) <= MAX_NO_TEST_BLOCKS


def test_block_parser_honours_the_marker() -> None:
    text = "x\n```python\na = 1\n```\n\n" + NO_TEST + "\n```python\nraise SystemExit\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n", True), (8, "raise SystemExit\n", False)]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_links_between_pages_resolve(page: Path) -> None:
    """Relative links to other pages and files of the docs folder point at something that exists."""
    for target, _anchor in _LINK.findall(page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        path = (page.parent / target).resolve()
        if path.parent == DOCS.resolve():
            assert path.exists(), f"{page.name} links to missing {target}"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = make_bpe_tokenizer()
    base_model = make_model("llama", vocab_size=len(tokenizer))
    # The toy tokenizer spells real reviews byte by byte: give contexts of real text room.
    base_model.config.max_position_embeddings = TINY_MAX_POSITIONS
    base_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path) -> None:
    monkeypatch.setenv("CPT_MODEL", str(tiny_model_dir))  # what load_model_and_tokenizer() loads
    monkeypatch.setenv("TQDM_DISABLE", "1")  # no progress bars in the test log
    monkeypatch.chdir(tmp_path)  # adapters and checkpoints written by the snippets land here


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_python_blocks_run(page: Path, tiny: None) -> None:
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, code, runs in python_blocks(page.read_text()):
        if not runs:
            continue
        if re.search(r"^\s*(import peft|from peft)", code, re.MULTILINE) and importlib.util.find_spec("peft") is None:
            continue
        if "load_dataset(" in code and importlib.util.find_spec("StaICC") is None:  # the rest may build on it
            pytest.skip(f"{page.name}:{line} loads a data set, which needs StaICC (pip install --no-deps StaICC==0.1.1)")
        torch.manual_seed(0)
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the block at {page.name}:{line} raised {type(error).__name__}") from error


@pytest.mark.slow
def test_smollm2_figures_quoted_by_the_docs() -> None:
    """The token counts and sizes the pages quote for SmolLM2 are what their code gives with it."""
    from transformers import AutoTokenizer

    from cpt import build_context
    from cpt.labelled_data import load_dataset, split_examples
    from cpt.pretrained import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    hidden = 576
    quickstart = " ".join((DOCS / "quickstart.md").read_text().split())
    examples = [("a gripping, beautifully shot film", "positive"), ("dull, slow and far too long", "negative"),
                ("the actors were wonderful", "positive"), ("I want those two hours back", "negative")]
    n = build_context(tokenizer, examples).num_virtual_tokens
    assert f"N = {n} tokens" in quickstart and f"2 x {n} x {hidden} x 4 = {2 * n * hidden * 4:,} bytes" in quickstart
    context, _, _ = split_examples(load_dataset("rotten_tomatoes"), per_class=2, n_test=20, seed=0)
    reviews = build_context(tokenizer, context).num_virtual_tokens
    assert f"4 rotten_tomatoes reviews is {reviews} tokens, about {2 * reviews * hidden * 4 / 1e6:.1f} MB" in quickstart

    config = build_context(tokenizer, [("a gripping film", "positive"), ("dull and long", "negative")])
    assert f"# SmolLM2: {config.num_virtual_tokens} {config.cpt_tokens_type_mask}" in (DOCS / "method.md").read_text()
