"""The admin API: experiments changed at run time, kept in Postgres, seen by every router sharing the database
and still there after a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fibreflow.serving.router import create_app
from serving_helpers import MSG, bearer, config, guarded, new_key

pytestmark = pytest.mark.integration
TRIAL = {"model": "trial", "salt": "x", "arms": [{"name": "only", "upstream": "local", "model": "beta", "weight": 1}]}


def test_changes_reach_every_router_and_survive_a_restart(
    keys_db: str, upstream: str, run_app: Any, project_tmp: Path
) -> None:
    cfg = guarded(upstream, experiments_poll_s=0.2)
    first, second = (run_app(create_app(cfg, redis_url="", database_url=keys_db, watch=False)) for _ in range(2))
    admin, chat = new_key(keys_db, ("admin",)), new_key(keys_db)

    def chat_on(base: str, model: str) -> httpx.Response:
        return httpx.post(f"{base}/v1/chat/completions", headers=bearer(chat),
                          json={"model": model, "messages": MSG, "max_tokens": 4})  # fmt: skip

    assert httpx.put(f"{first}/admin/experiments/trial", json=TRIAL, headers=bearer(chat)).status_code == 403
    put = httpx.put(f"{first}/admin/experiments/trial", json=TRIAL, headers=bearer(admin))
    assert put.status_code == 200 and put.json()["targets"] == {"only": "beta"}
    assert chat_on(first, "trial").headers["x-fibreflow-arm"] == "only"
    deadline = time.monotonic() + 10
    while chat_on(second, "trial").status_code != 200:  # the other router applies it on its next poll
        assert time.monotonic() < deadline, "the second router never saw the new experiment"
        time.sleep(0.1)
    restarted = run_app(create_app(cfg, redis_url="", database_url=keys_db, watch=False))
    assert chat_on(restarted, "trial").headers["x-fibreflow-arm"] == "only"  # kept across a restart
    bad = httpx.put(f"{first}/admin/experiments/trial", headers=bearer(admin),
                    json=TRIAL | {"arms": [TRIAL["arms"][0] | {"upstream": "nope"}]})  # fmt: skip
    assert bad.status_code == 400 and "unknown upstreams: nope" in bad.json()["error"]["message"]
    assert httpx.delete(f"{first}/admin/experiments/assistant", headers=bearer(admin)).status_code == 200
    deadline = time.monotonic() + 10
    while chat_on(second, "assistant").status_code != 404:  # a removal reaches the others too
        assert time.monotonic() < deadline, "the second router still serves the removed experiment"
        time.sleep(0.1)

    def listed() -> list[str]:
        got = httpx.get(f"{restarted}/admin/experiments", headers=bearer(admin)).json()
        return [e["model"] for e in got["experiments"]]

    while listed() != ["trial"]:
        assert time.monotonic() < deadline, listed()
        time.sleep(0.1)


def test_without_keys_the_admin_api_answers_loopback_only_and_keeps_changes_in_memory(
    upstream: str, run_app: Any, project_tmp: Path
) -> None:
    base = run_app(create_app(config(upstream), redis_url="", watch=False))
    assert httpx.put(f"{base}/admin/experiments/trial", json=TRIAL).json()["targets"] == {"only": "beta"}
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "trial", "messages": MSG, "max_tokens": 4})
    assert r.status_code == 200 and r.headers["x-fibreflow-arm"] == "only"
    assert httpx.delete(f"{base}/admin/experiments/trial").status_code == 200
    assert httpx.post(f"{base}/v1/chat/completions", json={"model": "trial", "messages": MSG}).status_code == 404
    assert [e["model"] for e in httpx.get(f"{base}/admin/experiments").json()["experiments"]] == ["assistant"]
