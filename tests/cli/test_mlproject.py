"""`mlflow run .` itself: cheap entry points through MLflow's own runner (`--env-manager local`) against a
temporary tracking store, so the MLproject's command templates cannot silently break."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def mlflow_run(entry: str, params: dict[str, str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "run", str(ROOT), "-e", entry, "--env-manager", "local", "--experiment-name", "mlproject"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_entry_points_run_through_mlflow_run(pg_url: str, project_tmp: Path) -> None:
    import mlflow

    uri = f"sqlite:///{project_tmp / 'mlflow.db'}"
    leaked = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")  # what earlier tests may have set
    env = {k: v for k, v in os.environ.items() if k not in leaked} | {
        "MLFLOW_TRACKING_URI": uri,
        "DATABASE_URL": pg_url,
        "FIBREFLOW_HOME": str(project_tmp),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the `fibreflow` the commands call
    }
    seeded = mlflow_run("seed", {"scale": "1", "seed": "7"}, env)
    assert seeded.returncode == 0, seeded.stderr[-2000:]
    with psycopg.connect(pg_url) as conn:
        meta = conn.execute("SELECT value FROM fibreflow_meta WHERE key = 'data_source'").fetchone()[0]
    assert meta["source"] == "demo-seed" and meta["seed"] == 7 and meta["rows"]["projects"] == 10
    built = mlflow_run("build_dataset", {"overrides": "grounded_qa.test_fraction=0.3"}, env)
    assert built.returncode == 0, built.stderr[-2000:]
    refused = mlflow_run("seed", {"seed": "8"}, env)  # its own data: replaced (no --replace-data needed)
    assert refused.returncode == 0, refused.stderr[-2000:]

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("mlproject").experiment_id], order_by=["start_time"])
    assert [r.data.tags["mlflow.project.entryPoint"] for r in runs] == ["seed", "build_dataset", "seed"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert runs[0].data.params | {"scale": "1", "seed": "7"} == runs[0].data.params
    build = runs[1]
    assert build.data.params["overrides"] == "grounded_qa.test_fraction=0.3"
    version = (project_tmp / "var/datasets/LATEST").read_text().strip()
    assert build.data.tags["dataset_version"] == version  # the build logged what it made into the project's run
    assert {d.dataset.name for d in build.inputs.dataset_inputs} >= {"fibreflow-terminology-train"}
