"""`fibreflow tune`: trials as nested MLflow runs, pruning on eval loss, the best config written back."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fibreflow.core.errors import ConfigError

pytestmark = pytest.mark.integration

SPACE = {
    "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
    "lora.r": {"type": "categorical", "choices": [2, 4]},
}


def _tune(home: Path, tiny: Path, write_config, **overrides) -> dict:
    from fibreflow.training.tune import main

    config = write_config(home, tiny, optim={"max_steps": 8}, heldout={"enabled": False})
    base = {"space": SPACE, "trials": 3, "study": "test-study", "pruner": {"type": "none"}}
    return main(base | overrides, train_config=str(config))


def test_trials_are_nested_runs_and_the_best_config_is_written(
    train_home: Path, tiny_llama: Path, write_config
) -> None:
    import mlflow
    from fibreflow.training.config import load_train_config

    result = _tune(train_home, tiny_llama, write_config)
    assert result["trials"] == {"COMPLETE": 3}
    client = mlflow.MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3 and {c.data.tags["optuna_trial"] for c in children} == {"0", "1", "2"}
    best_child = min(children, key=lambda c: c.data.metrics["eval_loss"])
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(result["best_eval_loss"])
    best = load_train_config(result["best_config"])  # a complete, valid train config
    assert best.optim.lr == pytest.approx(result["best_params"]["optim.lr"])
    assert best.lora.r == result["best_params"]["lora.r"]
    assert best_child.data.params["lora.r"] == str(best.lora.r)
    assert yaml.safe_load(Path(result["best_config"]).read_text())["model_path"] == str(tiny_llama)

    again = _tune(train_home, tiny_llama, write_config, trials=1)  # same sqlite storage: the study continues
    assert sum(again["trials"].values()) == 4


def test_pruner_stops_bad_trials(train_home: Path, tiny_llama: Path, write_config) -> None:
    with pytest.raises(ConfigError, match="no trial completed"):
        _tune(train_home, tiny_llama, write_config, trials=2, pruner={"type": "threshold", "upper": 1e-6})


def test_bad_search_key_is_named_before_any_trial(train_home: Path, tiny_llama: Path, write_config) -> None:
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        _tune(
            train_home,
            tiny_llama,
            write_config,
            space={"optim.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}},
        )


def test_workers_share_a_study_in_postgres(train_home: Path, tiny_llama: Path, write_config, pg_url: str) -> None:
    """Two `fibreflow tune` workers pointed at one Postgres storage add their trials to the same study."""
    from psycopg.conninfo import conninfo_to_dict

    c = conninfo_to_dict(pg_url)
    url = f"postgresql://{c['user']}@/{c['dbname']}?host={c['host']}&port={c.get('port', 5432)}"
    first = _tune(train_home, tiny_llama, write_config, trials=1, storage=url)
    second = _tune(train_home, tiny_llama, write_config, trials=1, storage=url)
    assert first["trials"] == {"COMPLETE": 1} and second["trials"] == {"COMPLETE": 2}
