"""The researcher notebooks run top to bottom in small mode and are committed without outputs.

Each notebook is executed with nbclient on the `python3` kernel, which jupyter_client launches
with this interpreter (the venv's), in a temporary working directory; an error in any cell fails
the test with that cell's traceback.
"""

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds; small mode takes a fraction of this on 2 CPU cores


def _code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_there_are_notebooks() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"01_quickstart.ipynb", "02_personalization.ipynb",
                                           "03_privacy_cost.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(_code_cells(notebook)):
        assert cell.outputs == [], f"{path.name}: code cell {index} has outputs; strip them"
        assert cell.execution_count is None, f"{path.name}: code cell {index} has a count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_ends_with_a_figure_and_a_table(
        path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits os.environ: small mode, and temporary folders under tmp_path.
    monkeypatch.delenv("FEDHEALTH_NOTEBOOK_FULL", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("FEDHEALTH_NOTEBOOK_DIR", str(work))
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    *cells, interpreter = _code_cells(notebook)
    assert interpreter.outputs[0]["text"].strip() == sys.executable
    closing = [output for cell in cells[-2:] for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in closing), \
        f"{path.name} does not end with a figure"
    assert any("━" in output.get("data", {}).get("text/plain", "") for output in closing), \
        f"{path.name} does not end with a table"
    assert list(tmp_path.iterdir()) == [work], f"{path.name} wrote into its working directory"
    assert len(list(work.iterdir())) == 1, f"{path.name} did not write into one temporary folder"
