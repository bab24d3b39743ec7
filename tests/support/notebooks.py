"""Tiny parameterized notebooks for report and schedule tests."""

from __future__ import annotations

from pathlib import Path

import nbformat


def make_notebook(path: Path, params: str, *cells: str) -> Path:
    """A small notebook: a `parameters` cell then code cells (fast: no meshlens import needed)."""
    first = nbformat.v4.new_code_cell(params)
    first.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[first, *(nbformat.v4.new_code_cell(c) for c in cells)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path
