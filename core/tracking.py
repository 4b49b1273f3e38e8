"""MLflow setup shared by every stage: the embedded sqlite default or $MLFLOW_TRACKING_URI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from typing import Any

from fibreflow.core.config import Strict, load_config, project_root, resolve_path
from fibreflow.core.errors import ConfigError


class TrackingConfig(Strict):
    uri: str | None = None
    artifacts: str = "var/mlflow/artifacts"


def load_tracking_config(overrides: dict[str, Any] | None = None) -> TrackingConfig:
    return load_config(TrackingConfig, "tracking", overrides)


def setup_mlflow(experiment: str) -> str:
    """Point MLflow at the configured store and select `experiment` (created with a local artifact root
    when the store is the sqlite default: MLflow's own default would be ./mlruns of the cwd). Returns its id.
    Under an active run (a stage of the pipeline) the parent's experiment stays, so child runs nest visibly; under
    `mlflow run` (MLFLOW_RUN_ID) the experiment is that run's (`mlflow run --experiment-name ...` chooses it)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    cfg = load_tracking_config()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    if uri is None:
        db = resolve_path("var/mlflow/mlflow.db")
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    if uri.startswith("sqlite:") and importlib.util.find_spec("sqlalchemy") is None:
        raise ConfigError(
            f"the tracking store {uri} needs the full mlflow package (the train extra); a router installed with the "
            "serve extra alone reads the registry from an MLflow server: set MLFLOW_TRACKING_URI=http://<server>:5000"
        )
    mlflow.set_tracking_uri(uri)
    if (active := mlflow.active_run()) is not None:  # a stage under a parent (the pipeline): its runs nest there
        return active.info.experiment_id
    if run_id := os.environ.get("MLFLOW_RUN_ID"):  # started by `mlflow run`: that run's experiment
        exp_id = mlflow.get_run(run_id).info.experiment_id
        mlflow.set_experiment(experiment_id=exp_id)
        return exp_id
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        exp_id = found.experiment_id
    elif uri.startswith("sqlite:") or uri.startswith("file:"):
        root = resolve_path(cfg.artifacts)
        root.mkdir(parents=True, exist_ok=True)
        exp_id = mlflow.create_experiment(experiment, artifact_location=(root / experiment).as_uri())
    else:
        exp_id = mlflow.create_experiment(experiment)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def newest_finished_run(condition: str) -> Any | None:
    """The most recently started FINISHED run, in any experiment, whose tags/params match `condition`."""
    import mlflow

    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"attributes.status = 'FINISHED' and {condition}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


def ui_link(path: str) -> str:
    """A link that opens `path` (e.g. `#/experiments/1/runs/<id>`) in the MLflow UI: under a tracking server, its
    URL; for a sqlite or file store, the path to open in `mlflow ui` started on that store."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    return f"{uri.rstrip('/')}/{path}" if uri.startswith("http") else f"mlflow ui: {path}"


def run_link(run: Any) -> str:
    return ui_link(f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")


def version_link(name: str, version: str) -> str:
    return ui_link(f"#/models/{name}/versions/{version}")


def git_sha() -> str:
    """The checkout's commit (with `-dirty` when it has uncommitted changes), or "unknown" outside git."""
    try:
        root = str(project_root())
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "-uno"], capture_output=True, text=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
