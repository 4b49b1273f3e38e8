"""The notebooks run top to bottom (executed by nbclient in a real kernel), so they cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def _run(name: str, cwd: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


@pytest.mark.integration
@pytest.mark.slow
def test_notebooks_run_top_to_bottom(
    eval_home: Path, tiny_llama: Path, random_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FIBREFLOW_NB_MODELS", f"{tiny_llama},{random_adapter}")
    monkeypatch.setenv("FIBREFLOW_NB_PER_TAG", '{"unknown_term": 2, "terminology": 4, "grounded_qa": 2}')
    for name in sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")):
        _run(name, eval_home)
