"""`fibreflow ab report` on traffic through the real router: the tiny model server behind arms a (alpha) and b
(beta), arm c on an upstream that is down (the fallback answers for it), b also the shadow arm; real users' votes
in Postgres. Then a registry experiment where the challenger wins live and `--promote` takes it through the gate."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from servers import until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MSG = [{"role": "user", "content": "What is a BOQ?"}]


def ask(base: str, key: str, user: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"model": "assistant", "messages": MSG, "user": user, "max_tokens": 4}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"} | (headers or {}))  # fmt: skip


def vote(base: str, key: str, response_id: str, thumbs: str) -> None:
    r = httpx.post(f"{base}/v1/feedback", json={"response_id": response_id, "thumbs": thumbs},
                   headers={"Authorization": f"Bearer {key}"}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text


def audited(url: str, n: int) -> bool:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM request_audit WHERE endpoint = '/v1/chat/completions'"
                            ).fetchone()[0] >= n  # fmt: skip


def test_the_report_per_arm_and_the_sequential_decision(
    keys_db: str, upstream: str, run_app: Any, store: str, project_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fibreflow.cli.main import app
    from fibreflow.monitor.ab import main, render
    from fibreflow.serving.config import ServingConfig
    from fibreflow.serving.keys import create
    from fibreflow.serving.router import create_app
    from typer.testing import CliRunner

    monkeypatch.setenv("DATABASE_URL", keys_db)
    arms = [{"name": "a", "upstream": "local", "model": "alpha", "weight": 0.45},
            {"name": "b", "upstream": "local", "model": "beta", "weight": 0.45},
            {"name": "c", "upstream": "dead", "model": "alpha", "weight": 0.1},
            {"name": "s", "upstream": "local", "model": "beta", "weight": 0}]  # fmt: skip
    cfg = ServingConfig.model_validate({"router": {
        "upstreams": {"local": {"url": f"{upstream}/v1"},
                      "dead": {"url": "http://127.0.0.1:9/v1", "connect_timeout_s": 0.3}},
        "experiments": [{"model": "assistant", "salt": "ab", "arms": arms, "shadow": "s"}],
        "fallback": {"upstream": "local", "model": "alpha"}, "cache": {"enabled": False},
        "audit": {"enabled": True, "flush_s": 0.1}, "limits": {"requests_per_minute": 10_000},
        "resilience": {"retries": 0, "breaker_failures": 3, "breaker_reset_s": 60}}})  # fmt: skip
    base = run_app(create_app(cfg, redis_url="", database_url=keys_db, watch=False))
    with psycopg.connect(keys_db, autocommit=True) as conn:
        key, qa = create(conn, "users", ["chat"])[0], create(conn, "qa", ["chat", "qa"])[0]
    start = dt.datetime.now(dt.UTC)

    answered: dict[str, int] = {"a": 0, "b": 0, "fallback": 0}
    for i in range(130):
        r = ask(base, key, f"user-{i}")
        assert r.status_code == 200, r.text
        arm = r.headers["x-fibreflow-arm"]
        answered[arm] += 1
        if arm != "fallback":  # users like beta's answers and not alpha's; the fallback's votes are nobody's arm
            vote(base, key, r.json()["id"], "up" if arm == "b" else "down")
    assert answered["a"] >= 30 and answered["b"] >= 30 and answered["fallback"] >= 3
    assert ask(base, qa, "qa", {"x-fibreflow-arm": "a"}).status_code == 200  # a regression run: not user traffic
    until(lambda: audited(keys_db, 131), 30, "the audit rows written")
    shadow_log = project_tmp / "var/serving/shadow.jsonl"
    until(lambda: shadow_log.is_file() and len(shadow_log.read_text().splitlines()) >= 130, 60,
          "the shadow copies of every request scored")  # fmt: skip

    rep = main("assistant", start, overrides={"ab.min_samples": 20})
    by = {a.arm: a for a in rep.arms}
    assert set(by) == {"a", "b", "c", "s"} and rep.control == "a"  # no arm is called champion: the first by name
    assert by["a"].requests == answered["a"] and by["b"].requests == answered["b"]  # the forced one left out
    assert by["c"].requests == answered["fallback"] and by["c"].error_rate.value == 1.0  # every c request fell back
    assert by["a"].error_rate.value == 0.0 and by["a"].error_rate.high is not None and by["a"].error_rate.high < 0.15
    assert by["b"].feedback_score.value == 1.0 and by["a"].feedback_score.value == 0.0
    assert by["b"].thumbs_up_rate.n == answered["b"] and by["a"].thumbs_up_rate.value == 0.0
    assert by["a"].p95_latency_ms.value is not None and by["a"].p95_latency_ms.n == answered["a"]
    assert by["s"].shadow_similarity.n >= 130 and 0 <= (by["s"].shadow_similarity.value or 0) <= 1
    assert by["s"].requests == 0 and by["s"].version == "beta"
    assert by["c"].votes == 0 and by["a"].version == "alpha"
    verdict = {c.arm: c for c in rep.comparisons}
    assert verdict["b"].decision == "winner" and verdict["b"].winner == "b" and verdict["b"].low > 0
    assert verdict["c"].decision == "no difference yet" and verdict["b"].alpha == 0.025  # two: s has no users
    text = render(rep)
    assert "b vs a: feedback score +1.000" in text and "-> winner: b" in text and "at most 5% in all" in text

    import mlflow

    run = mlflow.get_run(rep.run_id)
    assert run.data.metrics["b.feedback_score"] == 1.0 and run.data.tags["decision.b"] == "winner"
    assert {"ab/series.png", "ab/report.json"} <= {f.path for f in mlflow.MlflowClient().list_artifacts(
        rep.run_id, "ab")}  # fmt: skip

    # the command, with --promote on arms that are no registry versions: refused, recorded, nothing moved
    out = CliRunner().invoke(app, ["ab", "report", "--experiment", "assistant", "--since", start.isoformat(),
                                   "--promote", "--json", "--set", "ab.min_samples=20"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert '"decision": "refused"' in out.stdout
    missing = CliRunner().invoke(app, ["ab", "report", "--experiment", "nobody-asks-for-this"])
    assert missing.exit_code == 2 and "no traffic for nobody-asks-for-this" in missing.output


def test_a_challenger_that_wins_live_is_promoted_through_the_gate(
    gated_home: Path,
    tiny_llama: Path,
    tmp_path: Path,
    train_run: Any,
    run_app: Any,
    pg_url: str,
) -> None:
    import mlflow
    from fibreflow.core.db import migrate
    from fibreflow.monitor.ab import main
    from fibreflow.registry.registry import promote, register
    from fibreflow.serving.config import load_serving_config
    from fibreflow.serving.keys import create
    from fibreflow.serving.router import create_app
    from gated import serving_versions, write_reference_test_set

    register(train_run(tiny_llama, tmp_path / "a", 1))
    write_reference_test_set(gated_home, tmp_path / "a")
    assert promote()["promoted"]  # v1 is @champion
    register(train_run(tiny_llama, tmp_path / "a2", 1))  # v2, as good offline: @challenger
    with serving_versions(tiny_llama, run_app, (gated_home, tmp_path), ["1", "2"]) as (upstream, _):
        with psycopg.connect(pg_url, autocommit=True) as conn:
            migrate(conn)
            key = create(conn, "users", ["chat"])[0]
        serving = load_serving_config({
            "router.upstreams.primary.url": f"{upstream}/v1", "router.audit.flush_s": 0.1,
            "router.limits.requests_per_minute": 10_000,
            "router.schedule.periods": [], "router.cache.enabled": False, "router.fallback": None,
            "router.experiments": [{"model": "assistant", "salt": "s", "arms": [
                {"name": "champion", "upstream": "primary", "alias": "champion", "weight": 0.5},
                {"name": "challenger", "upstream": "primary", "alias": "challenger", "weight": 0.5}]}]})  # fmt: skip
        router = run_app(create_app(serving, redis_url="", database_url=pg_url))
        start = dt.datetime.now(dt.UTC)
        for i in range(90):
            r = ask(router, key, f"user-{i}")
            assert r.status_code == 200, r.text
            vote(router, key, r.json()["id"], "up" if r.headers["x-fibreflow-arm"] == "challenger" else "down")
        until(lambda: audited(pg_url, 90), 30, "the audit rows written")

    rep = main("assistant", start, promote=True, overrides={"ab.min_samples": 20})
    assert [(c.arm, c.decision, c.winner) for c in rep.comparisons] == [("challenger", "winner", "challenger")]
    assert rep.promotion is not None and rep.promotion["promoted"] and rep.promotion["decision"] == "passed"
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("fibreflow-assistant", "champion").version) == "2"
    v2 = client.get_model_version("fibreflow-assistant", "2")
    assert v2.tags["promotion.live_ab_run_id"] == rep.run_id and v2.tags["promotion.decision"] == "passed"
    ab_run = mlflow.get_run(rep.run_id)
    assert ab_run.data.tags["promotion.promoted"] == "True"
    assert mlflow.get_run(rep.promotion["decision_run_id"]).data.tags["mlflow.parentRunId"] == rep.run_id
