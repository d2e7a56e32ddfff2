"""The example notebook (docs/example.ipynb) runs from top to bottom: petra.search with keyword
overrides, the front as a DataFrame, its plotly plot, and petra.load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "example.ipynb"


def test_the_example_notebook_runs(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    notebook = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    front = notebook.cells[3].outputs[0]["data"]["text/plain"]
    assert "size_ratio" in front and "recipe" in front
    plot = notebook.cells[4].outputs[0]["data"]
    assert "application/vnd.plotly.v1+json" in plot or "plotly" in plot.get("text/html", "")
    assert (tmp_path / "notebook.db").exists()
