"""Training fixtures: a project home with a built dataset, and small train configs for the tiny Llama."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def train_home(project_tmp: Path, seeded_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project home with a dataset built from the seeded database (real build, real Parquet)."""
    import mlflow
    from fibreflow.core import db
    from fibreflow.datasets import build
    from fibreflow.datasets.config import load_data_config

    uri = f"sqlite:///{project_tmp / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # the process-wide URI an earlier test's run may have set
    cfg = load_data_config()
    with db.connect(seeded_url) as conn:
        build.build(conn, cfg, progress=False)
    return project_tmp
