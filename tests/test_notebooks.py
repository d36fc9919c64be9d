"""The notebooks researchers open first are executed on the synthetic set, so they never rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path: Path, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGEXP_ROOT", str(REPO))
    monkeypatch.setenv("SEGEXP_DATA", str(data_dir))
    monkeypatch.setenv("SEGEXP_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("SEGEXP_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert not errors
