"""Every ```python block in docs/ runs, so the docs stay true.

The blocks of one page run in order in one namespace (a page reads like a session: a later
block may use what an earlier one defined), in a temporary working directory, with a fixed
seed. A block is not run when the line just before its opening fence (blank lines aside) is
``<!-- skip -->`` or ``<!-- skip: reason -->``; that is kept for code that needs what the
test machine does not have (mmengine, JAX, torchft, several processes).

``torch.compile`` runs with the ``eager`` backend here: the pages claim that updates trace
as one graph (``fullgraph=True``), which the eager backend checks in a fraction of the
time; inductor code generation is covered by the modules' own tests.
"""

from __future__ import annotations

import functools
import re
import textwrap
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})\s*(?P<lang>[\w+-]*)[^\n]*$")
_SKIP = re.compile(r"^\s*<!--\s*skip(?::[^>]*)?\s*-->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(first line number, code, skipped)`` for each ```python block of a Markdown text,
    including blocks indented inside tabs and admonitions."""
    lines = text.splitlines()
    blocks: list[tuple[int, str, bool]] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, lang = m.group("indent"), m.group("ticks"), m.group("lang").lower()
        start = i + 1
        j = start
        while j < len(lines) and not (
            lines[j].strip().startswith(ticks) and lines[j].strip().strip("`") == ""
        ):
            j += 1
        if lang in ("python", "py"):
            body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[start:j]]
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            skipped = k >= 0 and bool(_SKIP.match(lines[k]))
            blocks.append((start + 1, textwrap.dedent("\n".join(body)), skipped))
        i = j + 1
    return blocks


PAGES = sorted(p for p in DOCS.rglob("*.md") if "_ext" not in p.parts)


def _runnable(page: Path) -> list[tuple[int, str]]:
    return [(line, code) for line, code, skipped in python_blocks(page.read_text()) if not skipped]


# Pages with code to run (the others, prose and API stubs, have nothing to test here).
RUNNABLE = [p for p in PAGES if _runnable(p)]


def test_the_docs_have_python_blocks() -> None:
    assert PAGES, f"no pages found under {DOCS}"
    assert sum(len(python_blocks(p.read_text())) for p in PAGES) > 20
    assert len(RUNNABLE) >= 10, [p.name for p in RUNNABLE]


def test_block_extraction() -> None:
    text = (
        "x\n```python\na = 1\n```\n<!-- skip: needs jax -->\n\n```python\nimport jax\n```\n"
        '=== "Tab"\n\n    ```python\n    if True:\n        b = 2\n    ```\n```bash\nls\n```\n'
    )
    blocks = python_blocks(text)
    assert [(code, skipped) for _, code, skipped in blocks] == [
        ("a = 1", False),
        ("import jax", True),
        ("if True:\n    b = 2", False),
    ]
    assert blocks[0][0] == 3


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _runnable(page)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for line, code in blocks:
        where = f"{page.relative_to(DOCS.parent)}:{line}"
        try:
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the docs are ours
        except Exception as err:
            raise AssertionError(
                f"the python block at {where} failed: {err!r}. Fix the block, or, if it cannot "
                "run on a single CPU process (distributed, mmengine, JAX), put the line "
                "<!-- skip: reason --> just before its fence"
            ) from err
