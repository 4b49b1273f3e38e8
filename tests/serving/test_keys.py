"""API keys, rate limits and the audit log: real Postgres (embedded), real Redis, real HTTP."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
from fibreflow.serving import keys
from fibreflow.serving.router import create_app
from serving_helpers import MSG, ask, audit_rows, bearer, guarded, new_key


@pytest.mark.integration
def test_keys_are_checked_and_every_request_is_audited(
    keys_db: str, upstream: str, run_app: Any, project_tmp: Path
) -> None:
    app = create_app(guarded(upstream), redis_url="", database_url=keys_db, watch=False)
    base = run_app(app)
    good = new_key(keys_db)
    admin_only = new_key(keys_db, ("admin",))
    expired = new_key(keys_db, expires_in=dt.timedelta(seconds=-1))
    kid, secret = keys.split(good)  # type: ignore[misc]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=good, max_retries=0)
    assert client.chat.completions.create(model="assistant", messages=MSG, max_tokens=4, temperature=0).choices[0]
    cases = [
        (None, 401, "missing API key"),
        ("sk-something", 401, "malformed API key"),
        (f"{kid}.wrong", 401, "invalid API key"),
        ("ffk_000000000000.x", 401, "invalid API key"),
        (expired, 401, "expired"),
        (admin_only, 403, "lacks the chat scope"),
    ]
    for key, status, message in cases:
        r = ask(base, key)
        assert r.status_code == status and message in r.json()["error"]["message"], (key, r.text)
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key=f"{kid}.nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        wrong.chat.completions.create(model="assistant", messages=MSG)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        wrong.models.list()
    assert [m.id for m in client.models.list().data] == ["assistant"]
    big = ask(base, good, messages=[{"role": "user", "content": "x" * 1_100_000}])
    too_long = ask(base, good, messages=[{"role": "user", "content": "pole " * 1100}])
    assert (big.status_code, too_long.status_code) == (413, 400)
    rows = audit_rows(keys_db, 12)
    assert [r["status"] for r in rows] == [200, 401, 401, 401, 401, 401, 403, 401, 401, 200, 413, 400]
    assert rows[0]["key_id"] == kid and rows[0]["arm"] in ("a", "b") and rows[0]["completion_tokens"] >= 1
    assert rows[-1]["key_id"] == kid and rows[-1]["arm"] and rows[-2]["arm"] is None  # 413: before any arm
    flat = " ".join(str(v) for r in rows for v in r.values())
    assert secret not in flat and "What is a BOQ" not in flat and "pole pole" not in flat  # never key or prompt
    state = app.state.router  # the refused requests left nothing but their audit rows
    assert len(state.cache.backend._items) == 1 and len(state.recent) == 1  # the one answered request


@pytest.mark.integration
def test_revoked_and_rotated_keys_stop_within_the_cache_bound(
    keys_db: str, upstream: str, run_app: Any, project_tmp: Path
) -> None:
    base = run_app(create_app(guarded(upstream), redis_url="", database_url=keys_db, watch=False))
    key = new_key(keys_db)
    kid = keys.split(key)[0]  # type: ignore[index]
    assert ask(base, key).status_code == 200
    with psycopg.connect(keys_db, autocommit=True) as conn:
        fresh, record = keys.rotate(conn, kid, dt.timedelta(seconds=0.5))
        assert record.rotated_from == kid
    assert ask(base, fresh).status_code == 200
    assert ask(base, key).status_code == 200  # inside the overlap window
    time.sleep(0.5 + 0.3 + 0.1)  # overlap + key cache bound
    old = ask(base, key)
    assert old.status_code == 401 and "expired" in old.json()["error"]["message"]
    with psycopg.connect(keys_db, autocommit=True) as conn:
        keys.revoke(conn, record.id)
        with pytest.raises(keys.ApiKeyError, match="already revoked"):
            keys.revoke(conn, record.id)
    time.sleep(0.3 + 0.1)
    gone = ask(base, fresh)
    assert gone.status_code == 401 and "revoked" in gone.json()["error"]["message"]


@pytest.mark.integration
@pytest.mark.parametrize("shared", [False, True])
def test_limits_answer_429_with_retry_after(
    keys_db: str, upstream: str, run_app: Any, project_tmp: Path, shared: bool
) -> None:
    import redis

    url = "redis://127.0.0.1:6379/15" if shared else ""
    if url:
        redis.Redis.from_url(url).flushdb()
    exact = {"requests_per_minute": 1000, "tokens_per_minute": None, "shared_staleness_s": 0}  # see limits.py
    routers = [
        run_app(create_app(guarded(upstream, limits=exact), redis_url=url, database_url=keys_db, watch=False))
        for _ in range(2 if shared else 1)
    ]
    key = new_key(keys_db, requests_per_minute=3)
    got = [ask(routers[i % len(routers)], key).status_code for i in range(4)]
    assert got == [200, 200, 200, 429]  # with Redis: the budget is shared by both routers
    refused = ask(routers[0], key)
    assert 1 <= int(refused.headers["Retry-After"]) <= 60 and "rate limit" in refused.json()["error"]["message"]
    thrifty = new_key(keys_db, tokens_per_minute=5)
    fresh_question = [{"role": "user", "content": "Which poles are in project 2?"}]  # not cached: tokens are spent
    assert ask(routers[0], thrifty, messages=fresh_question).status_code == 200  # > 5 tokens (prompt + answer)
    deadline = time.monotonic() + 5
    while ask(routers[-1], thrifty).status_code != 429:  # the spend is recorded just after the answer
        assert time.monotonic() < deadline


@pytest.mark.integration
def test_keys_cli_and_prompt_logging(
    keys_db: str, upstream: str, run_app: Any, project_tmp: Path, monkeypatch: pytest.MonkeyPatch, pg_url: str
) -> None:
    import json

    from fibreflow.cli.main import app
    from typer.testing import CliRunner

    monkeypatch.setenv("DATABASE_URL", keys_db)
    runner = CliRunner()
    made = runner.invoke(app, ["keys", "create", "--name", "frontend", "--scopes", "chat", "--rpm", "30"])
    assert made.exit_code == 0, made.output
    key = json.loads(made.output)["key"]
    listed = json.loads(runner.invoke(app, ["keys", "list"]).output)
    assert [k["name"] for k in listed] == ["frontend"] and "secret_sha256" not in listed[0]
    assert key.split(".")[1] not in runner.invoke(app, ["keys", "list"]).output
    bad = runner.invoke(app, ["keys", "create", "--name", "x", "--scopes", "root"])
    assert bad.exit_code == 2 and "scopes must be some of chat, admin" in bad.output
    base = run_app(
        create_app(
            guarded(upstream, audit={"enabled": True, "flush_s": 0.1, "log_prompts": True}),
            redis_url="",
            database_url=keys_db,
            watch=False,
        )
    )
    assert ask(base, key).status_code == 200
    assert audit_rows(keys_db, 1)[0]["prompt"] == "What is a BOQ?"
    rotated = runner.invoke(app, ["keys", "rotate", key.split(".")[0], "--overlap-hours", "0"])
    assert rotated.exit_code == 0 and json.loads(rotated.output)["replaces"] == key.split(".")[0]
    empty = psycopg.conninfo.make_conninfo(pg_url, dbname="keys_unmigrated")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE keys_unmigrated")
    monkeypatch.setenv("DATABASE_URL", empty)
    missing = runner.invoke(app, ["keys", "list"])
    assert missing.exit_code == 2 and "fibreflow db migrate" in missing.output
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE keys_unmigrated WITH (FORCE)")


@pytest.mark.integration
def test_shared_limits_converge_through_redis_and_hold_locally_without_it() -> None:
    import asyncio

    import redis
    from fibreflow.serving.limits import limiter

    url = "redis://127.0.0.1:6379/15"
    redis.Redis.from_url(url).flushdb()

    async def scenario() -> tuple[list[float | None], float | None, list[float | None], int]:
        a, b = limiter(url, 0.5, 1.0), limiter(url, 0.5, 1.0)
        on_a = [await a.admit("k", 3, None) for _ in range(4)]
        await asyncio.sleep(0.05)  # a's increments reach Redis right after each decision
        first_on_b = await b.admit("k", 3, None)  # a key new to b: b asks Redis before deciding
        down = limiter("redis://127.0.0.1:1/0", 0.2, 1.0)  # nothing listens there
        without_redis = [await down.admit("k", 3, None) for _ in range(4)]
        down.spend("k", 10)  # tokens are counted too
        errors = down.counts.errors  # type: ignore[attr-defined]
        for x in (a, b, down):
            await x.close()
        return on_a, first_on_b, without_redis, errors

    on_a, first_on_b, without_redis, errors = asyncio.run(scenario())
    assert on_a[:3] == [None, None, None] and on_a[3] is not None and 0 < on_a[3] <= 60
    assert first_on_b is not None  # refused: a used the shared budget
    # Redis down: this router counts its own traffic and the limit still holds (it used to let everything through)
    assert without_redis[:3] == [None, None, None] and without_redis[3] is not None
    assert errors >= 1


@pytest.mark.integration
def test_audit_rows_are_not_lost_on_a_clean_shutdown(keys_db: str, upstream: str, project_tmp: Path) -> None:
    """Rows wait for a flush every 60 s here; stopping the router writes them."""
    import threading

    import uvicorn
    from servers import free_port

    cfg = guarded(upstream, audit={"enabled": True, "flush_s": 60, "batch_size": 1000})
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(cfg, redis_url="", database_url=keys_db, watch=False),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    key = new_key(keys_db)
    statuses = [ask(f"http://127.0.0.1:{port}", k).status_code for k in (key, key, None)]
    assert statuses == [200, 200, 401]
    assert audit_rows(keys_db, 0) == []  # nothing flushed yet
    server.should_exit = True
    thread.join(timeout=30)
    assert [r["status"] for r in audit_rows(keys_db, 3)] == [200, 200, 401]


@pytest.mark.integration
def test_feedback_needs_a_key_is_stored_once_per_caller_and_joins_the_audit_row(
    keys_db: str, upstream: str, run_app: Any, project_tmp: Path
) -> None:
    base = run_app(create_app(guarded(upstream), redis_url="", database_url=keys_db, watch=False))
    key, other, admin = new_key(keys_db), new_key(keys_db), new_key(keys_db, ("chat", "admin"))
    r = ask(base, key, temperature=0.5)
    rid, arm, version = r.json()["id"], r.headers["x-fibreflow-arm"], r.headers["x-fibreflow-model-version"]

    def vote(k: str | None, **body: Any) -> httpx.Response:
        return httpx.post(f"{base}/v1/feedback", json={"response_id": rid} | body, headers=bearer(k))

    assert vote(None, thumbs="up").status_code == 401  # anyone can no longer vote
    assert vote(other, thumbs="down").status_code == 403  # not served to that key
    assert vote(key, thumbs="up").json() == {"status": "recorded", "response_id": rid, "arm": arm,
                                            "model_version": version}  # fmt: skip
    assert vote(key, score=0.25, comment="on second thought").status_code == 200  # replaces the first vote
    assert vote(admin, thumbs="down").status_code == 200  # an admin may rate any answer
    missing = httpx.post(f"{base}/v1/feedback", json={"response_id": "nope", "score": 0.2}, headers=bearer(key))
    assert missing.status_code == 404
    assert vote(key, score=0.2, thumbs="up").status_code == 400
    with psycopg.connect(keys_db) as conn:
        votes = conn.execute(
            "SELECT f.caller, f.score, f.thumbs, f.comment, a.arm, a.model_version FROM feedback f"
            " JOIN request_audit a ON a.response_id = f.response_id AND a.endpoint = '/v1/chat/completions'"
            " ORDER BY f.caller"
        ).fetchall()
    callers = sorted([keys.split(key)[0], keys.split(admin)[0]])  # type: ignore[index]
    assert [v[0] for v in votes] == callers and {v[4:] for v in votes} == {(arm, version)}
    mine = next(v for v in votes if v[0] == keys.split(key)[0])  # type: ignore[index]
    assert mine[1:4] == (0.25, None, "on second thought")
    # another router sharing the database finds the response in the audit log
    second = run_app(create_app(guarded(upstream), redis_url="", database_url=keys_db, watch=False))
    late = httpx.post(f"{second}/v1/feedback", json={"response_id": rid, "thumbs": "up"}, headers=bearer(key))
    assert late.status_code == 200 and late.json()["arm"] == arm


@pytest.mark.integration
def test_surfaces_need_keys_and_forcing_an_arm_needs_qa(
    keys_db: str, upstream: str, run_app: Any, project_tmp: Path
) -> None:
    from servers import free_port

    port = free_port()
    base = run_app(create_app(guarded(upstream, metrics_listen=f"127.0.0.1:{port}"), redis_url="",
                              database_url=keys_db, watch=False))  # fmt: skip
    chat, qa, scraper = new_key(keys_db), new_key(keys_db, ("chat", "qa")), new_key(keys_db, ("metrics",))
    for path in ("/docs", "/openapi.json"):  # off by default
        assert httpx.get(f"{base}{path}").status_code == 404
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}  # no key: up or down only
    assert set(httpx.get(f"{base}/health", headers=bearer(chat)).json()) == {"status", "arms", "cache"}
    assert httpx.get(f"{base}/metrics").status_code == 401
    assert httpx.get(f"{base}/metrics", headers=bearer(chat)).status_code == 403
    assert "fibreflow_router_requests" in httpx.get(f"{base}/metrics", headers=bearer(scraper)).text
    assert "fibreflow_router_requests" in httpx.get(f"http://127.0.0.1:{port}/metrics").text  # the private listener
    refused = ask(base, chat, headers={"x-fibreflow-arm": "b"})
    assert refused.status_code == 403 and "qa or admin scope" in refused.json()["error"]["message"]
    assert ask(base, qa, headers={"x-fibreflow-arm": "b"}).headers["x-fibreflow-arm"] == "b"
    docs = run_app(create_app(guarded(upstream, docs=True), redis_url="", database_url=keys_db, watch=False))
    assert "/v1/feedback" in httpx.get(f"{docs}/openapi.json").json()["paths"]


@pytest.mark.integration
def test_a_flood_of_random_keys_neither_evicts_real_ones_nor_loads_the_database(
    keys_db: str, upstream: str, run_app: Any, project_tmp: Path
) -> None:
    import secrets

    cfg = guarded(upstream, auth={"required": True, "cache_s": 60, "unknown_lookups_per_s": 5,
                                  "unknown_cache_size": 50})  # fmt: skip
    app = create_app(cfg, redis_url="", database_url=keys_db, watch=False)
    base = run_app(app)
    key = new_key(keys_db)
    assert ask(base, key).status_code == 200
    reads = app.state.router.keys.reads

    async def flood() -> list[int]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:  # 300 at once queue for the pool
            fake = [f"ffk_{secrets.token_hex(6)}.{secrets.token_urlsafe(8)}" for _ in range(300)]
            body = {"model": "assistant", "messages": MSG}
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", headers=bearer(k), json=body)
                                             for k in fake))  # fmt: skip
            return [r.status_code for r in replies]

    import asyncio
    import math
    import time

    started = time.monotonic()
    statuses = asyncio.run(flood())
    budget = 5 + math.ceil(5 * (time.monotonic() - started))  # a full bucket, then 5 a second while it lasted
    assert set(statuses) <= {401, 503} and 500 not in statuses
    assert app.state.router.keys.reads - reads <= budget < 100  # the lookup budget, not one read per fake key
    assert ask(base, key).status_code == 200  # the real key was neither evicted nor re-read
    assert app.state.router.keys.reads - reads <= budget


@pytest.mark.integration
def test_every_token_counts_against_the_limit_embeddings_and_prompts_too(
    keys_db: str, upstream: str, run_app: Any, project_tmp: Path
) -> None:
    base = run_app(create_app(guarded(upstream), redis_url="", database_url=keys_db, watch=False))
    thrifty = new_key(keys_db, tokens_per_minute=50)
    text = "pole planted on Main Street " * 12  # ~60 tokens of the embedding model: over the budget alone
    first = httpx.post(f"{base}/v1/embeddings", json={"model": "default", "input": text}, headers=bearer(thrifty))
    assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] > 50
    deadline = time.monotonic() + 5
    while ask(base, thrifty).status_code != 429:  # the spend is recorded just after the answer
        assert time.monotonic() < deadline, "embedding tokens were not counted"


@pytest.mark.integration
def test_no_row_holds_up_the_audit_log(keys_db: str, run_app: Any, project_tmp: Path) -> None:
    """A NUL byte in a field (COPY refuses it) is made safe; a row Postgres still refuses (an upstream reporting
    absurd usage) is dropped alone and counted; every other row is written."""
    from fastapi import FastAPI
    from serving_helpers import metric

    fake = FastAPI()

    @fake.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        absurd = body["messages"][-1]["content"] == "absurd"
        usage = {"prompt_tokens": 10**12 if absurd else 3, "completion_tokens": 2, "total_tokens": 5}
        message = {"role": "assistant", "content": "ok"}
        return {"id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}  # fmt: skip

    limits = {"requests_per_minute": 1000, "tokens_per_minute": None}
    cfg = guarded(run_app(fake), audit={"enabled": True, "flush_s": 0.2, "batch_size": 100}, limits=limits)
    base = run_app(create_app(cfg, redis_url="", database_url=keys_db, watch=False))
    key, admin = new_key(keys_db), new_key(keys_db, ("admin",))
    assert ask(base, key, model="assist\x00ant").status_code == 404
    assert ask(base, key, messages=[{"role": "user", "content": "absurd"}]).status_code == 200
    assert [ask(base, key, messages=[{"role": "user", "content": f"q{i}"}]).status_code for i in range(3)] == [200] * 3
    rows = audit_rows(keys_db, 4)
    assert len(rows) == 4 and rows[0]["model"] == "assist\ufffdant" and rows[0]["status"] == 404
    assert all(r["prompt_tokens"] == 3 for r in rows[1:])  # the absurd row alone was dropped
    assert metric(base, "fibreflow_router_audit_rows_total", headers=bearer(admin), outcome="dropped_invalid") == 1
