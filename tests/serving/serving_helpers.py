"""Helpers shared by the serving tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import psycopg
from fibreflow.serving.config import ServingConfig

MSG = [{"role": "user", "content": "What is a BOQ?"}]


def config(upstream: str, **router: Any) -> ServingConfig:
    """A router in front of `upstream` (the tiny model server): experiment `assistant` = arms a (alpha), b (beta)."""
    arms = [
        {"name": "a", "upstream": "local", "model": "alpha", "weight": 0.5},
        {"name": "b", "upstream": "local", "model": "beta", "weight": 0.5},
    ]
    tree = {
        "upstreams": {"local": {"url": f"{upstream}/v1", "timeout_s": 30}},
        "experiments": [{"model": "assistant", "salt": "s1", "arms": arms}],
        "auth": {"required": False},
        "audit": {"enabled": False},
    } | router
    return ServingConfig.model_validate({"router": tree})


def tool_config(upstream: str, **router: Any) -> ServingConfig:
    """A router in front of `upstream` serving the tool-calling tiny model: experiment `assistant` = arm a (tiny);
    the frontend's endpoints answer from it."""
    arms = [{"name": "a", "upstream": "local", "model": "tiny", "weight": 1.0}]
    more = {"experiments": [{"model": "assistant", "salt": "s", "arms": arms}], "fibreflow": {"model": "assistant"}}
    return config(upstream, **(more | router))


def metric(base: str, name: str, headers: dict[str, str] | None = None, **labels: str) -> float:
    """A sample's value from the router's /metrics (0 when absent); `headers` carry a metrics key."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", headers=headers).text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def guarded(upstream: str, **router: Any) -> ServingConfig:
    """The router config with keys, limits and audit on (short key cache, quick audit flushes)."""
    on = {
        "auth": {"required": True, "cache_s": 0.3},
        "audit": {"enabled": True, "flush_s": 0.1},
        "limits": {"requests_per_minute": 1000, "tokens_per_minute": None},
    }
    return config(upstream, **(on | router))


def new_key(url: str, scopes: tuple[str, ...] = ("chat",), **kw: Any) -> str:
    from fibreflow.serving import keys

    with psycopg.connect(url, autocommit=True) as conn:
        return keys.create(conn, "test", list(scopes), **kw)[0]


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def ask(base: str, key: str | None, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    body = {"model": "assistant", "messages": MSG, "max_tokens": 4, "temperature": 0} | kw
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=bearer(key) | (headers or {}), timeout=60)


def audit_rows(url: str, n: int, timeout_s: float = 10) -> list[dict[str, Any]]:
    """The audit rows once `n` have arrived (they are written in batches, off the request path)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            rows = cur.execute("SELECT * FROM request_audit ORDER BY id").fetchall()
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)
