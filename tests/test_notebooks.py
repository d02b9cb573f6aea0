"""Every notebook executes from its source on small settings, and the committed copy is current."""

import json
import os
import pathlib

import nbformat
import pytest

from notebooks.build_notebooks import HERE, build

NAMES = sorted(p.stem for p in (HERE / "src").glob("*.py"))


@pytest.mark.slow  # executes every notebook
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, monkeypatch):
    monkeypatch.setenv("JAXLORA_SMALL", "1")
    # The kernel imports this checkout's jaxlora and experiments, not an installed copy.
    path = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    notebook = build(name, timeout=600)
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_its_source(name):
    committed = nbformat.read(pathlib.Path(HERE / f"{name}.ipynb"), as_version=4)
    fresh = build(name, execute=False)
    assert [c.source for c in committed.cells] == [c.source for c in fresh.cells], (
        f"notebooks/{name}.ipynb is stale: run `python notebooks/build_notebooks.py {name}`"
    )
    assert any(c.get("outputs") for c in committed.cells), "outputs must be kept"
    json.dumps(committed)  # a valid notebook file
