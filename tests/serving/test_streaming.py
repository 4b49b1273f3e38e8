"""Clients that leave, upstreams that stall, and what each stream is counted as: generation stops for a client
that went away, every request gets exactly one audit row (499 for a client that left), streams are timed per
read, and token limits count the upstream's real usage."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fibreflow.serving.router import create_app
from serving_helpers import MSG, audit_rows, bearer, guarded, new_key

pytestmark = pytest.mark.integration
LONG = {"model": "assistant", "messages": MSG, "max_tokens": 900, "temperature": 0}


def idle(engine: Any, timeout_s: float = 30) -> int:
    """The engine's generated-token count once it has stopped changing."""
    last, deadline = -1, time.monotonic() + timeout_s
    while engine.tokens != last and time.monotonic() < deadline:
        last = engine.tokens
        time.sleep(0.3)
    return engine.tokens


@pytest.fixture
def router(keys_db: str, upstream: str, run_app: Any, project_tmp: Path) -> tuple[str, str]:
    """A router with keys and audit in front of the tiny model server: (base URL, a chat key)."""
    base = run_app(create_app(guarded(upstream), redis_url="", database_url=keys_db, watch=False))
    return base, new_key(keys_db)


def test_a_client_that_leaves_stops_the_generation(router: tuple[str, str], tiny_engine: Any, keys_db: str) -> None:
    base, key = router
    for stream in (True, False):
        before = idle(tiny_engine)
        body = LONG | {"stream": stream, "messages": [{"role": "user", "content": f"Leave early ({stream})"}]}
        if stream:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=bearer(key)) as r:
                assert r.status_code == 200
                chunks = r.iter_raw()
                next(chunks), next(chunks)  # the first tokens arrived; the client goes
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/v1/chat/completions", json=body, headers=bearer(key), timeout=0.3)
        generated = idle(tiny_engine) - before
        assert 0 < generated < 700, (stream, generated)  # 900 asked (and made without a disconnect): it stopped early
    statuses = [r["status"] for r in audit_rows(keys_db, 2)]
    assert statuses == [499, 499]


def test_a_finished_stream_counts_real_usage_and_passes_usage_on_only_when_asked(
    router: tuple[str, str], keys_db: str
) -> None:
    base, key = router
    body = {"model": "assistant", "messages": MSG, "max_tokens": 6, "temperature": 0, "user": "u1"}
    whole = httpx.post(f"{base}/v1/chat/completions", json=body, headers=bearer(key)).json()
    for wants in (False, True):
        extra = {"stream_options": {"include_usage": True}} if wants else {}
        raw = httpx.post(f"{base}/v1/chat/completions", json=body | {"stream": True} | extra, headers=bearer(key))
        events = [orjson.loads(line[6:]) for line in raw.text.split("\n\n") if line.startswith("data: {")]
        usage = [e for e in events if e.get("usage")]
        assert (len(usage) == 1) is wants and all(e["choices"] or e.get("usage") for e in events)
        assert raw.text.rstrip().endswith("data: [DONE]")
    rows = audit_rows(keys_db, 3)
    assert [r["status"] for r in rows] == [200, 200, 200]
    u = whole["usage"]
    for row in rows:  # the streams' rows carry the upstream's own counts, prompt included
        assert (row["prompt_tokens"], row["completion_tokens"]) == (u["prompt_tokens"], u["completion_tokens"])
    assert len({r["response_id"] for r in rows}) == 3 and all(r["response_id"] for r in rows)


def slow_upstream(delay_headers_s: float, gap_s: float, chunks: int, stall_after: int | None = None) -> FastAPI:
    """An OpenAI-like upstream that waits before answering, then streams `chunks` events `gap_s` apart (and goes
    quiet for good after `stall_after` of them)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        await asyncio.sleep(delay_headers_s)

        async def events() -> Any:
            for i in range(chunks):
                if stall_after is not None and i == stall_after:
                    await asyncio.sleep(3600)
                delta = {"content": f"t{i} "}
                yield b"data: " + orjson.dumps({"id": "chatcmpl-slow", "choices": [{"index": 0, "delta": delta}]})
                yield b"\n\n"
                await asyncio.sleep(gap_s)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_streams_are_timed_per_read_and_a_client_leaving_before_the_first_event_is_audited(
    keys_db: str, run_app: Any, project_tmp: Path
) -> None:
    def router_for(fake: FastAPI) -> str:
        up = {"url": f"{run_app(fake)}/v1", "timeout_s": 1, "stream_read_timeout_s": 0.6}
        cfg = guarded("http://unused", upstreams={"local": up}, resilience={"retries": 0})
        return run_app(create_app(cfg, redis_url="", database_url=keys_db, watch=False))

    key = new_key(keys_db)
    body = {"model": "assistant", "messages": MSG, "stream": True}
    # 12 events 0.25 s apart: 3 s in all, three times the 1 s limit of a whole answer, never 0.6 s between reads
    steady = httpx.post(f"{router_for(slow_upstream(0, 0.25, 12))}/v1/chat/completions", json=body,
                        headers=bearer(key), timeout=30)  # fmt: skip
    assert steady.status_code == 200 and steady.text.count("t11") == 1 and "[DONE]" in steady.text
    # an upstream that goes quiet mid-stream: an error event, audited as a timeout
    stalled = httpx.post(f"{router_for(slow_upstream(0, 0.05, 10, stall_after=3))}/v1/chat/completions", json=body,
                         headers=bearer(key), timeout=30)  # fmt: skip
    assert "t2" in stalled.text and "t3" not in stalled.text and "upstream_timeout" in stalled.text
    # the client gives up before the upstream has even answered
    late = router_for(slow_upstream(0.5, 0.05, 3))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{late}/v1/chat/completions", json=body, headers=bearer(key), timeout=0.2)
    rows = audit_rows(keys_db, 3)
    assert [r["status"] for r in rows] == [200, 504, 499]
    assert rows[1]["error"] == "the upstream stream timed out" and rows[2]["error"] == "the client disconnected"
