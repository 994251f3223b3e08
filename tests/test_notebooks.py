"""The notebooks in notebooks/ run top to bottom in a fresh kernel, as a reader would run
them, and are stored without outputs (so the repository holds only what people write).

Each notebook is executed with nbclient in a new ipykernel started from this interpreter
(jupyter_client replaces the kernel spec's ``python`` with ``sys.executable``), in a
temporary working directory. Any cell error fails the test with the cell and its traceback.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["01-quickstart.ipynb", "02-evolution.ipynb", "03-service.ipynb"]
# Per cell, generous for a loaded 2-core CI machine: the notebooks take well under a minute
# each on an idle one. A timeout is a failure to finish, not a speed assertion.
CELL_TIMEOUT = 600


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _run(notebook: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    return client.execute()


def test_the_notebooks_are_all_there():
    assert [p.name for p in _notebooks()] == EXPECTED


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_stored_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    for index, cell in enumerate(code):
        assert cell.outputs == [], f"{path.name}: code cell {index} is stored with outputs"
        assert cell.execution_count is None, f"{path.name}: code cell {index} has an execution count"


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_runs_top_to_bottom(path: Path, tmp_path: Path):
    notebook = nbformat.read(path, as_version=4)
    executed = _run(notebook, tmp_path)
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    # Every code cell ran, in order (an error would have raised CellExecutionError).
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    # The stored notebook is untouched: running it is no reason to commit outputs.
    assert all(cell.outputs == [] for cell in nbformat.read(path, as_version=4).cells
               if cell.cell_type == "code")


def test_a_failing_cell_fails_the_run(tmp_path: Path):
    """The harness itself: an exception in a cell stops the run and names the error, and
    the cells after it do not run."""
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("x = 1"),
               nbformat.v4.new_code_cell("raise ValueError('cell two is broken')"),
               nbformat.v4.new_code_cell("open('after', 'w').write('ran')")],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    with pytest.raises(CellExecutionError, match="cell two is broken"):
        _run(notebook, tmp_path)
    assert not (tmp_path / "after").exists()
