"""`fibreflow trace` from a real response id: a request served through the router (audit on, real Postgres) by a
registered version trained on a dataset built from the seeded database and promoted by the gate, then measured
once by `regress`. The trace must reach every hop: audit row, version, training run, dataset manifest, promotion,
regression runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from gated import serving_versions, write_reference_test_set
from servers import until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_trace_walks_from_a_served_response_to_the_dataset_and_the_promotion(
    gated_home: Path,
    tiny_llama: Path,
    tmp_path: Path,
    train_run: Any,
    run_app: Any,
    pg_url: str,
    seeded_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psycopg
    from fibreflow.cli.main import app
    from fibreflow.core.db import migrate
    from fibreflow.datasets.build import build
    from fibreflow.datasets.config import load_data_config
    from fibreflow.monitor.regress import main as regress
    from fibreflow.monitor.trace import TraceError, trace
    from fibreflow.registry.registry import promote, register
    from fibreflow.serving.config import load_serving_config
    from fibreflow.serving.keys import create
    from fibreflow.serving.router import create_app
    from typer.testing import CliRunner

    with psycopg.connect(seeded_url, autocommit=True) as conn:  # a real dataset version from the seeded database
        data = build(conn, load_data_config({"output_dir": str(tmp_path / "datasets")}), progress=False)
    run_id = train_run(tiny_llama, tmp_path / "a", 1, data=data)
    write_reference_test_set(gated_home, tmp_path / "a")
    register(run_id)
    promoted = promote()
    assert promoted["promoted"] and promoted["version"] == "1"

    with serving_versions(tiny_llama, run_app, (gated_home, tmp_path), ["1"]) as (upstream, _):
        with psycopg.connect(pg_url, autocommit=True) as conn:
            migrate(conn)
            chat_key = create(conn, "ops-desk", ["chat"])[0]
            monkeypatch.setenv("FIBREFLOW_QA_KEY", create(conn, "regression", ["chat", "qa"])[0])
        serving = load_serving_config({
            "router.upstreams.primary.url": f"{upstream}/v1", "router.alias_poll_s": 0.2, "router.audit.flush_s": 0.1,
            "router.schedule.periods": [], "router.cache.enabled": False, "router.fallback": None,
            "router.experiments": [{"model": "fibreflow-assistant", "salt": "s", "arms": [
                {"name": "champion", "upstream": "primary", "alias": "champion", "weight": 1}]}]})  # fmt: skip
        router = run_app(create_app(serving, redis_url="", database_url=pg_url))
        auth = {"Authorization": f"Bearer {chat_key}"}
        body = {"model": "fibreflow-assistant", "max_tokens": 8,
                "messages": [{"role": "user", "content": "What does fibreflow code 3 mean?"}]}  # fmt: skip
        answer = httpx.post(f"{router}/v1/chat/completions", json=body, headers=auth, timeout=60)
        assert answer.status_code == 200, answer.text
        response_id = answer.json()["id"]
        rating = {"response_id": response_id, "thumbs": "down", "comment": "wrong code"}
        vote = httpx.post(f"{router}/v1/feedback", json=rating, headers=auth, timeout=10)
        assert vote.status_code == 200, vote.text
        regress({"router.base_url": f"{router}/v1", "router.arms": ["champion"], "bootstrap_resamples": 1000})

        def audited() -> bool:
            with psycopg.connect(pg_url) as conn:
                return conn.execute("SELECT count(*) FROM request_audit WHERE response_id = %s",
                                    (response_id,)).fetchone()[0] >= 2  # fmt: skip

        until(audited, 30, "the audit rows written")

    t = trace(response_id)
    assert t.response is not None and t.response.key_name == "ops-desk" and t.response.arm == "champion"
    assert t.response.model_version == "1" and t.response.completion_tokens and t.response.latency_ms > 0
    assert [(f["thumbs"], f["comment"]) for f in t.response.feedback] == [("down", "wrong code")]
    assert t.version is not None and t.version.aliases == ["challenger", "champion"]
    assert t.training is not None and t.training.run_id == run_id and t.training.tags["config_hash"] == "hash1"
    assert t.dataset is not None and t.dataset.version == data.name == t.training.tags["dataset_version"]
    assert t.dataset.manifest.database.table_rows["projects"] > 0 and t.dataset.manifest.source_queries
    assert t.promotion is not None and t.promotion.decision == "passed" and t.promotion.against == "base"
    assert t.promotion.eval_run_id == promoted["eval_run_id"] and t.promotion.decision_run_id == promoted[
        "decision_run_id"]  # fmt: skip
    assert any("accuracy" in r for r in t.promotion.reasons) and "accuracy" in t.promotion.diff
    assert [(g.arm, g.status) for g in t.regressions] == [("champion", "ok")]
    assert t.gaps == []
    assert all(link.startswith("mlflow ui: #/") for link in
               (t.version.link, t.training.link, t.promotion.eval_link, t.regressions[0].link))  # fmt: skip

    cli = CliRunner()
    text = cli.invoke(app, ["trace", response_id])
    assert text.exit_code == 0, text.output
    for hop in ("Response " + response_id, "Model version fibreflow-assistant v1", f"Training run {run_id}",
                f"Dataset {data.name}", "Promotion: passed against base", "Regression runs of v1: 1"):  # fmt: skip
        assert hop in text.output
    as_json = cli.invoke(app, ["trace", "@champion", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["dataset"]["version"] == data.name

    with pytest.raises(TraceError, match="no audit row answered with response id 'chatcmpl-nope'"):
        trace("chatcmpl-nope")
    missing = cli.invoke(app, ["trace", "v9"])
    assert missing.exit_code == 2 and "has no version 9" in missing.output
