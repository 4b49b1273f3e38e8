"""The main job end to end (`fibreflow main`, what `mlflow run .` runs) on a small config, twice: the second run
reuses every unchanged step. Real embedded Postgres + pgvector, real MLflow, a tiny Llama as the base model."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_home(tmp_path: Path, tiny_llama: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project home: 2 demo projects in an empty database, the catalogue's default base is the tiny Llama."""
    import mlflow

    home = tmp_path / "home"
    shutil.copytree(ROOT / "configs", home / "configs")

    def edit(name: str, change: Callable[[dict], None]) -> None:
        tree = yaml.safe_load((home / "configs" / name).read_text())
        change(tree)
        (home / "configs" / name).write_text(yaml.safe_dump(tree))

    edit("seed.yaml", lambda t: t.update(projects_per_scale=2, seed=7))
    edit(
        "models.yaml",
        lambda t: t["models"].update({"smollm2-135m-instruct": {"path": str(tiny_llama), "max_context": 1024}}),
    )
    edit("eval.yaml", lambda t: t.update(
        sample={"seed": 0, "per_tag": {"unknown_term": 2, "terminology": 6, "grounded_qa": 4}},
        generation={"batch_size": 8, "max_new_tokens": 8, "dtype": "float32"},
        semantic_similarity=False, bootstrap={"resamples": 1000, "seed": 0, "confidence": 0.95}))  # fmt: skip
    monkeypatch.setenv("FIBREFLOW_HOME", str(home))
    monkeypatch.setenv("DATABASE_URL", pg_url)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return home


@pytest.mark.integration
@pytest.mark.slow
def test_main_job_runs_whole_then_reuses_everything(small_home: Path, tiny_llama: Path, write_config) -> None:
    import mlflow
    from fibreflow.cli.pipeline import main

    config = write_config(
        small_home, tiny_llama, heldout={"known": 4, "unknown": 2, "batch_size": 4, "max_new_tokens": 8}
    )
    cfg = yaml.safe_load(config.read_text())
    cfg.pop("model_path")  # the catalogue entry is the tiny Llama: `base` and the trained base are the same
    config.write_text(yaml.safe_dump(cfg))

    first = main(train_config=str(config), progress=False)
    assert first["seed"]["reused"] is False and first["train"]["reused"] is False
    assert first["evaluate"].reused is False and first["register"] == first["register"] | {
        "version": "1",
        "reused": False,
    }
    assert first["promote"]["decision"] in ("passed", "refused")
    assert "register: fibreflow-assistant v1" in first["report"] and "promote v1" in first["report"]
    parent = f"tags.mlflow.parentRunId = '{first['run_id']}'"
    children = mlflow.search_runs(search_all_experiments=True, filter_string=parent, output_format="list")
    names = {r.info.run_name.split("-")[0] for r in children}
    assert {"seed", "build_dataset", "embed", "train", "eval", "promote"} <= names, names

    second = main(train_config=str(config), progress=False)
    assert second["seed"]["reused"] and second["train"]["reused"] and second["evaluate"].reused
    assert second["train"]["run_id"] == first["train"]["run_id"]
    assert second["evaluate"].run_id == first["evaluate"].run_id
    assert second["register"]["reused"] and second["register"]["version"] == "1"
    assert second["embed"]["embedded"] == 0  # nothing changed, nothing re-embedded
    trained = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.config_hash != ''", output_format="list"
    )
    assert len(trained) == 1
    assert not any(k.startswith("heldout_") for k in trained[0].data.metrics)  # the evaluation asks those phrasings
    evaluated = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.eval_key != ''", output_format="list"
    )
    assert len(evaluated) == 1  # the promotion judged the existing evaluation again instead of evaluating anew
