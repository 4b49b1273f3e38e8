"""The arena: the page in a real headless browser (Debian's chromium driven by Playwright) against the real router,
the tiny model server behind arms a (adapter alpha) and b (beta), keys, audit rows and votes in Postgres."""

from __future__ import annotations

import datetime as dt
import shutil
from typing import Any

import httpx
import psycopg
import pytest
from servers import until

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"


def arena_router(run_app: Any, upstream: str, db: str) -> str:
    from fibreflow.serving.config import ServingConfig
    from fibreflow.serving.router import create_app

    cfg = ServingConfig.model_validate({"router": {
        "upstreams": {"local": {"url": f"{upstream}/v1"}},
        "experiments": [
            {"model": "assistant", "salt": "arena", "arms": [
                {"name": "a", "upstream": "local", "model": "alpha", "weight": 0.5},
                {"name": "b", "upstream": "local", "model": "beta", "weight": 0.5}]},
            {"model": "solo", "salt": "s", "arms": [{"name": "only", "upstream": "local", "model": "alpha",
                                                     "weight": 1}]}],
        "cache": {"enabled": False}, "audit": {"enabled": True, "flush_s": 0.1}}})  # fmt: skip
    return run_app(create_app(cfg, redis_url="", database_url=db, watch=False))


def post(base: str, path: str, key: str, body: Any) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def feedback_rows(db: str) -> dict[str, tuple[Any, ...]]:
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT response_id, arm, model_version, score, thumbs, comment FROM feedback").fetchall()
    return {r[0]: r[1:] for r in rows}


def test_battles_and_votes_through_the_api(
    run_app: Any, upstream: str, keys_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fibreflow.monitor.ab import load
    from fibreflow.monitor.config import Ab
    from fibreflow.serving.keys import create

    monkeypatch.setenv("DATABASE_URL", keys_db)

    base = arena_router(run_app, upstream, keys_db)
    with psycopg.connect(keys_db, autocommit=True) as conn:
        key, other = create(conn, "staff", ["chat"])[0], create(conn, "other", ["chat"])[0]
    start = dt.datetime.now(dt.UTC)

    r = post(base, "/v1/arena/battles", key, {"question": "What is a BOQ?", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert "x-fibreflow-arm" not in r.headers and '"arm"' not in r.text  # blind
    first, second = r.json()["answers"]
    assert first["id"] != second["id"] and first["content"] and second["content"]

    # a tie: 0.5 on both, no thumbs; the names come back only now
    r = post(base, "/v1/arena/votes", key, {"a": first["id"], "b": second["id"], "vote": "tie"})
    assert r.status_code == 200, r.text
    assert {r.json()["a"]["arm"], r.json()["b"]["arm"]} == {"a", "b"}
    rows = feedback_rows(keys_db)
    assert rows[first["id"]][2:4] == (0.5, None) and rows[second["id"]][2:4] == (0.5, None)
    assert {rows[first["id"]][0], rows[second["id"]][0]} == {"a", "b"}
    # changing one's mind replaces the vote: B better
    assert post(base, "/v1/arena/votes", key, {"a": first["id"], "b": second["id"], "vote": "b"}).status_code == 200
    rows = feedback_rows(keys_db)
    assert rows[first["id"]][2:4] == (0.0, "down") and rows[second["id"]][2:4] == (1.0, "up")
    assert rows[second["id"]][4] == f"arena: b (against {first['id']})"

    # every answer is a request of its own, forced to its arm; the A/B report counts the votes, not the requests
    def audited() -> list[tuple[Any, ...]]:
        with psycopg.connect(keys_db) as conn:
            return conn.execute("SELECT arm, routed_arm, forced, status, response_id FROM request_audit "
                                "WHERE endpoint = '/v1/arena/battles' ORDER BY arm").fetchall()  # fmt: skip

    until(lambda: len(audited()) >= 2, 30, "both answers audited")
    assert [(a, ra, f, s) for a, ra, f, s, _ in audited()] == [("a", "a", True, 200), ("b", "b", True, 200)]
    assert {row[4] for row in audited()} == {first["id"], second["id"]}
    traffic = load("assistant", start, Ab())
    assert traffic.requests == []  # not the split's traffic
    assert sorted((v[0], v[2]) for v in traffic.votes) == sorted([(rows[first["id"]][0], 0.0),
                                                                  (rows[second["id"]][0], 1.0)])  # fmt: skip

    # refusals: 4xx in OpenAI's shape, nothing stored
    before = feedback_rows(keys_db)
    cases = [
        (post(base, "/v1/arena/votes", other, {"a": first["id"], "b": second["id"], "vote": "a"}), 403, "a"),
        (post(base, "/v1/arena/votes", key, {"a": first["id"], "b": "nope", "vote": "a"}), 404, "b"),
        (post(base, "/v1/arena/votes", key, {"a": first["id"], "b": first["id"], "vote": "a"}), 400, None),
        (post(base, "/v1/arena/votes", key, {"a": first["id"], "b": second["id"], "vote": "c"}), 400, "vote"),
        (post(base, "/v1/arena/battles", key, {"question": "hi", "model": "solo"}), 409, "model"),
        (post(base, "/v1/arena/battles", key, {"question": "hi", "model": "nobody"}), 404, "model"),
        (post(base, "/v1/arena/battles", key, {"question": ""}), 400, "question"),
        (post(base, "/v1/arena/battles", "ff-wrong", {"question": "hi"}), 401, None),
    ]
    for resp, status, param in cases:
        assert resp.status_code == status, (status, resp.text)
        error = resp.json()["error"]
        assert error["message"] and (param is None or error["param"] == param), resp.text
    assert feedback_rows(keys_db) == before
    assert httpx.get(f"{base}/arena").headers["content-security-policy"].startswith("default-src 'none'")


def test_the_arena_page_in_chromium(run_app: Any, upstream: str, keys_db: str) -> None:
    assert shutil.which("chromium") == CHROMIUM, "Debian's chromium is missing: scripts/test.sh installs it (as root)"
    from fibreflow.serving.keys import create
    from playwright.sync_api import expect, sync_playwright

    base = arena_router(run_app, upstream, keys_db)
    with psycopg.connect(keys_db, autocommit=True) as conn:
        key = create(conn, "staff", ["chat"])[0]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"{r.url}: {r.failure}"))
            page.goto(f"{base}/arena")
            expect(page.locator("#ask")).to_be_disabled()  # no key yet

            page.fill("#key", "ff-not-a-key")
            page.click("#save-key")
            expect(page.locator("#status")).to_contain_text("The key was not accepted")
            page.click("#forget-key")
            page.fill("#key", key)
            page.click("#save-key")
            expect(page.locator("#model option")).to_have_count(2)
            page.select_option("#model", "assistant")
            page.fill("#question", "What is a BOQ?")
            page.click("#ask")
            expect(page.locator("#vote-a")).to_be_enabled(timeout=60_000)
            shown_a, shown_b = page.text_content("#answer-a"), page.text_content("#answer-b")
            assert shown_a and shown_b
            assert page.text_content("#who-a") == "" and page.text_content("#reveal") == ""  # blind until the vote

            page.click("#vote-a")
            expect(page.locator("#reveal")).to_contain_text("your vote is recorded")
            revealed = page.text_content("#reveal") or ""
            page.reload()  # the key stays for the tab
            expect(page.locator("#key-set")).to_be_visible()
            expect(page.locator("#ask")).to_be_enabled()
            assert errors == []
        finally:
            browser.close()

    rows = feedback_rows(keys_db)
    assert sorted(r[2] for r in rows.values()) == [0.0, 1.0]
    winner = next(r for r in rows.values() if r[2] == 1.0)
    loser = next(r for r in rows.values() if r[2] == 0.0)
    assert winner[3] == "up" and loser[3] == "down" and {winner[0], loser[0]} == {"a", "b"}
    assert f"A was {winner[0]} ({winner[1]}), B was {loser[0]} ({loser[1]})" in revealed
