"""Writes the notebooks from their cell sources and executes them so their outputs are kept.

    python notebooks/build_notebooks.py            # all notebooks
    python notebooks/build_notebooks.py quickstart # one

The test suite executes the same notebooks (tests/test_notebooks.py) with JAXLORA_SMALL=1.
"""

from __future__ import annotations

import pathlib
import sys

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent


def cells_of(source: str) -> list:
    """Splits a source on lines '# %% [markdown]' / '# %%' into markdown and code cells."""
    cells, kind, lines = [], None, []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(
                line.removeprefix("# ").removeprefix("#") for line in text.splitlines()
            )
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif kind == "code" and text:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def build(name: str, execute: bool = True, timeout: int = 900) -> nbformat.NotebookNode:
    source = (HERE / "src" / f"{name}.py").read_text()
    notebook = nbformat.v4.new_notebook(cells=cells_of(source))
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    if execute:
        NotebookClient(
            notebook,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(HERE)}},
        ).execute()
    return notebook


def main() -> None:
    names = sys.argv[1:] or sorted(p.stem for p in (HERE / "src").glob("*.py"))
    for name in names:
        notebook = build(name)
        nbformat.write(notebook, HERE / f"{name}.ipynb")
        print(f"wrote notebooks/{name}.ipynb")


if __name__ == "__main__":
    main()
