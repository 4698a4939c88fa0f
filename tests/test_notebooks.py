"""The researcher notebooks run top to bottom in small mode and are committed without outputs.

Each notebook is executed with nbclient on the `python3` kernel, which jupyter_client launches
with this interpreter (the venv's), in a temporary working directory; an error in any cell fails
the test with that cell's traceback.
"""

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds; small mode takes a fraction of this on 2 CPU cores
# Notebooks that run federations name what they learnt: {strategy label: mean balanced accuracy}.
LEARNED = "FEDERATED_BALANCED_ACCURACY"
LEARNS = {"01_quickstart", "02_personalization"}
LEARNS_ABOVE = 0.7  # clearly off chance (0.5) after the small mode's rounds
# Appended after the last cell: every Rich table the notebook holds, with its title, headers and rows.
LIST_TABLES = """import json as _json
from rich.table import Table as _Table
print(_json.dumps({"tables": [{"title": str(t.title or ""), "rows": t.row_count,
                                "headers": [str(c.header) for c in t.columns]}
                               for t in list(globals().values()) if isinstance(t, _Table)],
                    "learned": globals().get(_LEARNED)}))
""".replace("_LEARNED", repr(LEARNED))


def _words(text: str) -> set[str]:
    """Words of a printed table, whatever its box glyphs and however Rich wrapped its cells."""
    return set(re.findall(r"[\w/.%()'-]+", re.sub(r"\x1b\[[0-9;]*m", " ", text)))  # no ANSI styles


def _execute(notebook: nbformat.NotebookNode, folder: Path) -> dict[str, object]:
    """Run `notebook` in `folder`; return the Rich tables it ends up holding and what it says it
    learnt (see LIST_TABLES)."""
    notebook.cells.append(nbformat.v4.new_code_cell(LIST_TABLES))
    NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(folder)}}).execute()
    return json.loads(_code_cells(notebook)[-1].outputs[0]["text"])


def _shows_a_table(outputs: list[nbformat.NotebookNode], tables: list[dict[str, object]]) -> bool:
    """Some table the notebook built has rows, and its title and headers are in `outputs`."""
    shown = _words("\n".join(str(output.get("text", "")) + output.get("data", {}).get("text/plain", "")
                              for output in outputs))
    return any(table["rows"] and _words(" ".join([table["title"], *table["headers"]])) <= shown
               for table in tables)


def _code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_there_are_notebooks() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"01_quickstart.ipynb", "02_personalization.ipynb",
                                           "03_privacy_cost.ipynb", "04_ct_federation.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(_code_cells(notebook)):
        assert cell.outputs == [], f"{path.name}: code cell {index} has outputs; strip them"
        assert cell.execution_count is None, f"{path.name}: code cell {index} has a count"


# each notebook its own xdist group: the longest tests of the suite, sharing no fixture
@pytest.mark.slow
@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=pytest.mark.xdist_group(p.stem))
                                  for p in NOTEBOOKS])
def test_notebook_runs_and_ends_with_a_figure_and_a_table(
        path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits os.environ: small mode, and temporary folders under tmp_path.
    monkeypatch.delenv("FEDHEALTH_NOTEBOOK_FULL", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("FEDHEALTH_NOTEBOOK_DIR", str(work))
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    state = _execute(notebook, tmp_path)
    tables: list[dict[str, object]] = state["tables"]  # type: ignore[assignment]

    *cells, interpreter, _ = _code_cells(notebook)
    assert interpreter.outputs[0]["text"].strip() == sys.executable
    closing = [output for cell in cells[-2:] for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in closing), \
        f"{path.name} does not end with a figure"
    assert _shows_a_table(closing, tables), f"{path.name} does not end with a table"
    assert list(tmp_path.iterdir()) == [work], f"{path.name} wrote into its working directory"
    assert len(list(work.iterdir())) == 1, f"{path.name} did not write into one temporary folder"
    learned = state["learned"]
    if path.stem in LEARNS:
        assert isinstance(learned, dict) and learned, f"{path.name} does not say what it learnt"
        assert max(learned.values()) > LEARNS_ABOVE, f"{path.name}: no federated run learnt: {learned}"


def test_table_detection_needs_a_printed_table_with_rows(tmp_path: Path) -> None:
    """The check above, on three one-cell notebooks: only a printed table with rows passes."""
    make = ("from rich import print as rprint\nfrom rich.table import Table\n"
            "table = Table(title='accuracy by round')\ntable.add_column('round')\n"
            "table.add_column('hospital-1', justify='right')\n")
    for source, expected in ((make + "table.add_row('0', '0.500')\nrprint(table)", True),
                             (make + "table.add_row('0', '0.500')\nprint('no table here')", False),
                             (make + "rprint(table)", False)):
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
        tables = _execute(notebook, tmp_path)["tables"]
        assert _shows_a_table(_code_cells(notebook)[0].outputs, tables) is expected, source
