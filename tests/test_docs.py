"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one page run in page order in one namespace, as a reader would paste them into a
notebook, from the repository root (so ``../shared`` is the shared data). Signatures, shell
lines, doctest sessions and long jobs belong in other fences (```text, ```bash, ```pycon).
A script meant to be saved and launched from a command line (``torchrun script.py``), or code
that needs what only a long job leaves behind (a finished training run), goes in a ```py fence:
it is compiled (a syntax check), not run. A page that reads the shared Omniglot data is skipped
when the data is missing.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
OMNIGLOT = "../shared/data/omniglot"

_FENCE = re.compile(r"^```(\S*)[ \t]*$")


def python_blocks(text: str, language: str = "python") -> list[tuple[int, str]]:
    """``(first line number, source)`` of every ```python (``language``) block of a page."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        end = next(
            (j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"),
            None,
        )
        if end is None:
            raise AssertionError(f"line {i + 1}: a ``` fence that is never closed")
        if match.group(1) == language:
            blocks.append((i + 2, "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return blocks


def test_the_block_parser():
    page = "text\n```python\na = 1\n```\n```bash\nls\n```\n```\nplain\n```\n```python\nb = a\n```\n"
    assert python_blocks(page) == [(3, "a = 1\n"), (12, "b = a\n")]
    assert python_blocks(page, "bash") == [(6, "ls\n")]
    with pytest.raises(AssertionError, match="never closed"):
        python_blocks("```python\nx = 1\n")


def test_every_page_is_collected():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/maml.md", "docs/scan.md", "docs/data.md"} <= names
    assert sum(len(python_blocks(p.read_text())) for p in PAGES) >= 30


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_py_blocks_compile(page):
    """```py blocks (scripts for a command line) are not run, but must be valid Python."""
    for line, source in python_blocks(page.read_text(), "py"):
        compile("\n" * (line - 1) + source, str(page), "exec")


@pytest.fixture
def clean_torch_state(monkeypatch):
    """Run from the repository root; give back the RNG, dtype and thread settings afterwards."""
    monkeypatch.chdir(ROOT)
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    with torch.random.fork_rng():
        yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run_in_page_order(page, clean_torch_state):
    text = page.read_text()
    blocks = python_blocks(text)
    if not blocks:
        pytest.skip("no ```python blocks")
    if any(OMNIGLOT in source for _, source in blocks) and not (ROOT / OMNIGLOT).is_dir():
        pytest.skip(f"{page.name} reads the Omniglot data at {OMNIGLOT}, which is missing")
    namespace: dict[str, object] = {"__name__": "__docs__"}
    name = page.relative_to(ROOT).as_posix()
    for line, source in blocks:
        start = time.perf_counter()
        try:
            # pad with blank lines so that tracebacks give the page's own line numbers
            exec(compile("\n" * (line - 1) + source, str(page), "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"{name}, the ```python block at line {line} failed: {type(error).__name__}: "
                f"{error}"
            ) from error
        elapsed = time.perf_counter() - start
        print(f"{name}:{line}: {elapsed:.1f} s")
