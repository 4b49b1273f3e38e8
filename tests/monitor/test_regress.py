"""`fibreflow regress` against a real router in front of the real local model server, real MLflow and Postgres.

The registry holds v1 and v2, both adapter A (right on every suite question: the references are A's own answers);
@champion is v2, promoted over v1. The model server then serves v2 correctly (nothing raised), then a known-worse
adapter under v2's name (caught, alerted, rolled back to v1), then the router goes away (unmeasured, no rollback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from gated import serving_versions, write_reference_test_set

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def webhook(run_app: Any) -> tuple[str, list[dict[str, Any]]]:
    """A test webhook receiver: (its URL, the bodies it received)."""
    received: list[dict[str, Any]] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(body: dict[str, Any]) -> dict[str, str]:
        received.append(body)
        return {"ok": "yes"}

    return f"{run_app(app)}/hook", received


def test_a_served_model_that_differs_from_the_evaluated_one_is_caught_and_rolled_back(
    gated_home: Path,
    tiny_llama: Path,
    tmp_path: Path,
    train_run: Any,
    run_app: Any,
    pg_url: str,
    webhook: tuple[str, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow
    import psycopg
    from fibreflow.core.db import migrate
    from fibreflow.core.errors import LockBusy
    from fibreflow.monitor.regress import main as regress
    from fibreflow.registry.registry import promote, register
    from fibreflow.serving.config import load_serving_config
    from fibreflow.serving.keys import create
    from fibreflow.serving.router import create_app

    good = train_run(tiny_llama, tmp_path / "a", 1)
    train_run(tiny_llama, tmp_path / "b", 2)  # the known-worse adapter, in tmp_path / "b"
    write_reference_test_set(gated_home, tmp_path / "a")
    register(good)
    assert promote()["promoted"]  # v1 over the base model
    register(train_run(tiny_llama, tmp_path / "a2", 1))  # the same weights again: v2
    assert promote()["promoted"]  # v2 over v1: @champion = v2, previous v1; @challenger = v2
    client = mlflow.MlflowClient()

    # the upstream: the tiny base with v2's adapter as registered; the router with keys in front of it
    with serving_versions(tiny_llama, run_app, (gated_home, tmp_path), ["2"]) as (upstream, engine):
        with psycopg.connect(pg_url, autocommit=True) as conn:
            migrate(conn)
            qa_key = create(conn, "regression", ["chat", "qa"])[0]
        monkeypatch.setenv("FIBREFLOW_QA_KEY", qa_key)
        serving = load_serving_config({
            "router.upstreams.primary.url": f"{upstream}/v1", "router.alias_poll_s": 0.2,
            "router.audit.enabled": False, "router.schedule.periods": [], "router.cache.enabled": False,
            "router.fallback": None})  # fmt: skip
        router = run_app(create_app(serving, redis_url="", database_url=pg_url))
        url, received = webhook
        cfg = {"router.base_url": f"{router}/v1", "alert.webhook_url": url, "bootstrap_resamples": 1000}

        healthy = regress(cfg)
        assert [(r.arm, r.version, r.status) for r in healthy] == [("champion", "2", "ok"), ("challenger", "2", "ok")]
        assert received == []  # a healthy model raises nothing
        champion_run = mlflow.get_run(healthy[0].run_id)
        assert champion_run.data.metrics["model.fibreflow-assistant-v2.accuracy"] == 1.0
        assert champion_run.data.tags["status"] == "ok" and champion_run.data.tags["baseline_eval_run_id"]
        art = {a.path for a in client.list_artifacts(healthy[0].run_id, "regression")}
        assert {"regression/series.png", "regression/rows.json", "regression/summary.json"} <= art

        # a known-worse adapter served under v2's name: what the offline evaluation never saw
        engine.unload_adapter("fibreflow-assistant-v2")
        engine.load_adapter("fibreflow-assistant-v2", str(tmp_path / "b"))
        caught = regress(cfg)
        assert [r.status for r in caught] == ["regressed", "regressed"]
        champ = caught[0]
        verdict = next(v for v in champ.verdicts if v.metric == "accuracy")
        assert verdict.regressed and verdict.diff.high < -0.05 and verdict.diff.n == 8
        assert champ.actions["rollback"] == "@champion v2 -> v1" and champ.actions["alert"] == "delivered (200)"
        assert str(client.get_model_version_by_alias("fibreflow-assistant", "champion").version) == "1"
        v2 = client.get_model_version("fibreflow-assistant", "2")
        assert v2.tags["rolled_back"].startswith(f"regression run {champ.run_id}")
        assert v2.tags["regression.champion.last_status"] == "regressed"
        first = received[0]
        assert first["status"] == "regressed" and first["version"] == "2" and first["arm"] == "champion"
        assert first["metrics"]["accuracy"]["ci_high"] < 0 and champ.run_id in first["run_url"]
        assert "REGRESSED" in first["text"] and "Rollback: @champion v2 -> v1" in first["text"]
        assert received[1]["arm"] == "challenger" and "rollback" not in received[1]["actions"]  # not in the policy

        # the router unreachable: unmeasured, its own alert, no rollback, no score
        gone = regress(cfg | {"router.base_url": "http://127.0.0.1:9/v1", "router.retries": 0}, arms=["champion"])
        assert [r.status for r in gone] == ["unmeasured"] and "did not answer" in gone[0].reasons[0]
        assert received[-1]["status"] == "unmeasured" and "rollback" not in gone[0].actions
        assert not any(k.startswith("model.") for k in mlflow.get_run(gone[0].run_id).data.metrics)
        assert str(client.get_model_version_by_alias("fibreflow-assistant", "champion").version) == "1"

        # one regression run at a time
        with psycopg.connect(pg_url, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(hashtext('fibreflow-regress'))")
            with pytest.raises(LockBusy, match=r"a regression run .* is already under way"):
                regress(cfg)
