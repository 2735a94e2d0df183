"""Every notebook in notebooks/ runs from top to bottom, and is committed with its outputs.

Each notebook runs in a fresh ``python3`` kernel with ``nbclient`` (the engine behind
``jupyter execute`` and ``jupyter nbconvert --execute``), in the notebooks/ directory, with a
time limit per cell. The committed file is not rewritten; after changing a notebook, refresh
its outputs with ``jupyter execute`` (installed with nbclient):

    jupyter execute --inplace notebooks/<name>.ipynb
"""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 120  # seconds; each notebook takes well under 30 s on 2 CPU cores


def test_there_are_notebooks() -> None:
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "adapter", "mixed_precision"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: small models, busy CI
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError with the cell and its traceback
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert all(out.output_type != "error" for out in cell.outputs), cell.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    # Executed once, top to bottom, in a fresh kernel: execution counts 1, 2, 3, ...
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts}; run "
        f"`jupyter execute --inplace notebooks/{path.name}`"
    )
    assert any(c.outputs for c in code), f"{path.name} was committed without outputs"
    for c in code:
        assert all(out.output_type != "error" for out in c.outputs), c.source
