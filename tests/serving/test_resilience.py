"""Retries, fallback, circuit breaker, overload and the workload schedule."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from fibreflow.serving.config import Period, Schedule
from fibreflow.serving.resilience import Breaker, period
from fibreflow.serving.router import create_app
from serving_helpers import config, metric

MSG = [{"role": "user", "content": "What is a BOQ?"}]


def fail(b: Breaker) -> None:
    with b.attempt() as a:  # type: ignore[union-attr]
        a.failed()


def test_breaker_opens_half_opens_and_closes() -> None:
    b = Breaker(failures=2, reset_s=0.2)
    fail(b)
    assert b.ready() and b.state == "closed"
    fail(b)
    assert b.state == "open" and not b.ready() and b.attempt() is None
    time.sleep(0.25)
    trial = b.attempt()
    assert trial is not None and b.attempt() is None  # half-open: exactly one trial
    with trial:
        trial.failed()  # the trial failed: open again
    assert b.attempt() is None
    time.sleep(0.25)
    with b.attempt() as a:  # type: ignore[union-attr]
        a.ok()
    assert b.state == "closed" and b.attempt() is not None and b.attempt() is not None


def test_a_trial_that_decides_nothing_frees_the_slot() -> None:
    """A half-open trial that ends without a verdict (answered from the cache, the client left, a 4xx) must not
    keep the breaker open for good."""
    b = Breaker(failures=1, reset_s=0.1)
    fail(b)
    time.sleep(0.15)
    trial = b.attempt()
    assert trial is not None and b.attempt() is None
    try:
        with trial:
            raise asyncio.CancelledError  # the client went away mid-call
    except asyncio.CancelledError:
        pass
    assert b.state == "half_open" and b.ready()
    with b.attempt() as a:  # type: ignore[union-attr]
        a.ok()
    assert b.state == "closed"


def test_schedule_periods_in_local_time() -> None:
    sched = Schedule.model_validate({"timezone": "Africa/Johannesburg", "periods": [
        {"name": "month_end", "last_days_of_month": 2, "route": "fallback"},
        {"name": "weekends", "weekdays": ["sat", "sun"], "route": "champion"},
        {"name": "business_hours", "weekdays": ["mon", "tue", "wed", "thu", "fri"], "hours": [7, 18],
         "route": "experiment"},
        {"name": "after_hours", "route": "champion"}]})  # fmt: skip

    def at(*args: int) -> str | None:
        p = period(sched, dt.datetime(*args, tzinfo=dt.UTC))
        return p.name if isinstance(p, Period) else None

    assert at(2026, 11, 26, 8, 0) == "business_hours"  # Thursday 10:00 in Johannesburg
    assert at(2026, 11, 26, 16, 30) == "after_hours"  # 18:30 local
    assert at(2026, 11, 26, 4, 59) == "after_hours"  # 06:59 local (UTC+2)
    assert at(2026, 11, 26, 5, 0) == "business_hours"  # 07:00 local
    assert at(2026, 11, 28, 10, 0) == "weekends"
    assert at(2026, 11, 29, 10, 0) == "month_end"  # the 29th of a 30-day month
    assert at(2026, 2, 27, 10, 0) == "month_end"  # February: 27th and 28th


def shaky(upstream: str, **router: Any) -> Any:
    """Arms a and b on a dead upstream; the fallback is the tiny base on the live one."""
    cfg = config(upstream, fallback={"upstream": "local", "model": "tiny"}, **router)
    dead = {"url": "http://127.0.0.1:9/v1", "timeout_s": 2, "connect_timeout_s": 0.5}
    arms = [a.model_copy(update={"upstream": "dead"}) for a in cfg.router.experiments[0].arms]
    exp = cfg.router.experiments[0].model_copy(update={"arms": arms})
    upstreams = cfg.router.upstreams | {"dead": cfg.router.upstreams["local"].model_validate(dead)}
    return cfg.model_copy(
        update={"router": cfg.router.model_copy(update={"experiments": [exp], "upstreams": upstreams})}
    )


def post(base: str, **kw: Any) -> httpx.Response:
    body = {"model": "assistant", "messages": MSG, "max_tokens": 4, "temperature": 0, "user": "u1"} | kw
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)


@pytest.mark.integration
def test_upstream_down_retries_then_falls_back_then_breaker_opens(
    upstream: str, run_app: Any, project_tmp: Path
) -> None:
    cfg = shaky(upstream, resilience={"retries": 1, "breaker_failures": 2, "breaker_reset_s": 60})
    base = run_app(create_app(cfg, redis_url="", watch=False))
    direct = httpx.post(f"{upstream}/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 4,
                                                                 "temperature": 0}).json()  # fmt: skip
    reasons = []
    for i in range(4):
        r = post(base, messages=[{"role": "user", "content": f"What is a BOQ? ({i})"}])
        assert r.status_code == 200 and r.headers["x-fibreflow-arm"] == "fallback"
        assert r.headers["x-fibreflow-model-version"] == "tiny"
        reasons.append(r.headers["x-fibreflow-fallback"])
    # each attempt counts: the first request's two (one retry) open the breaker
    assert reasons == ["upstream_error", "breaker_open", "breaker_open", "breaker_open"]
    assert post(base).json()["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    arm = r.headers["x-fibreflow-arm"]
    assert arm == "fallback"
    assert sum(metric(base, "fibreflow_router_upstream_retries_total", arm=a) for a in "ab") == 1
    assert metric(base, "fibreflow_router_breaker_open", upstream="dead") == 1
    assert metric(base, "fibreflow_router_fallbacks_total", reason="breaker_open") >= 2


@pytest.mark.integration
def test_overload_and_schedule_route_to_the_fallback(upstream: str, run_app: Any, project_tmp: Path) -> None:
    cfg = config(
        upstream, fallback={"upstream": "local", "model": "tiny"}, resilience={"max_latency_s": 0.000001}
    )  # any answer is "too slow" afterwards
    base = run_app(create_app(cfg, redis_url="", watch=False))
    first, second = post(base, temperature=0.5), post(base, temperature=0.5)
    assert "x-fibreflow-fallback" not in first.headers and first.headers["x-fibreflow-arm"] in ("a", "b")
    assert second.headers["x-fibreflow-fallback"] == "overload_latency"
    always = {"timezone": "UTC", "periods": [{"name": "month_end", "route": "fallback"}]}
    sched = run_app(create_app(config(upstream, fallback={"upstream": "local", "model": "tiny"}, schedule=always),
                               redis_url="", watch=False))  # fmt: skip
    assert post(sched).headers["x-fibreflow-fallback"] == "schedule_month_end"
    to_b = {"timezone": "UTC", "periods": [{"name": "after_hours", "route": "b"}]}
    only_b = run_app(create_app(config(upstream, schedule=to_b), redis_url="", watch=False))
    assert {post(only_b, user=f"user{i}").headers["x-fibreflow-arm"] for i in range(8)} == {"b"}
    with pytest.raises(ValueError, match="no fallback is configured"):
        config(upstream, schedule=always)


class Flaky:
    """An upstream whose next answers are set by the test: "ok", "down" (503), "bug" (500) or "slow" (2 s)."""

    def __init__(self) -> None:
        self.mode, self.calls = "ok", 0
        self.app = FastAPI()

        @self.app.post("/v1/chat/completions")
        async def chat(body: dict[str, Any]) -> Any:
            self.calls += 1
            if self.mode == "down":
                return JSONResponse({"error": {"message": "overloaded"}}, 503)
            if self.mode == "bug":
                return JSONResponse({"error": {"message": "generation failed: IndexError"}}, 500)
            if self.mode == "proxy":  # something in between answering in its own shape
                return PlainTextResponse("<html>Not Found</html>", 404)
            if self.mode == "slow":
                await asyncio.sleep(2)
            text = body["messages"][-1]["content"]
            return {"id": f"chatcmpl-{self.calls}", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": f"arm: {text}"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}  # fmt: skip


@pytest.mark.integration
def test_a_half_open_trial_is_never_lost_and_only_unavailability_counts(
    upstream: str, run_app: Any, project_tmp: Path
) -> None:
    flaky = Flaky()
    cfg = config(upstream, fallback={"upstream": "local", "model": "tiny"},
                 resilience={"retries": 0, "breaker_failures": 1, "breaker_reset_s": 0.5})  # fmt: skip
    arms = [a.model_copy(update={"upstream": "flaky"}) for a in cfg.router.experiments[0].arms]
    flaky_up = cfg.router.upstreams["local"].model_copy(update={"url": f"{run_app(flaky.app)}/v1", "timeout_s": 10})
    router_cfg = cfg.router.model_copy(update={"upstreams": cfg.router.upstreams | {"flaky": flaky_up},
        "experiments": [cfg.router.experiments[0].model_copy(update={"arms": arms})]})  # fmt: skip
    base = run_app(create_app(cfg.model_copy(update={"router": router_cfg}), redis_url="", watch=False))

    def q(text: str, **kw: Any) -> httpx.Response:
        return post(base, messages=[{"role": "user", "content": text}], **kw)

    assert q("cached question").headers["x-fibreflow-cache"] == "miss"  # answered by the arm, now cached
    # a 500 is the upstream failing on this request: passed on as a 502, not retried, no fallback, no breaker
    flaky.mode, calls = "bug", flaky.calls
    bug = q("a question that breaks it")
    assert bug.status_code == 502 and "IndexError" in bug.json()["error"]["message"] and flaky.calls == calls + 1
    flaky.mode = "proxy"  # a 4xx not in OpenAI's shape is put in it
    odd = q("through a proxy")
    assert odd.status_code == 404 and "answered 404: <html>Not Found" in odd.json()["error"]["message"]
    flaky.mode = "down"  # unavailable: the fallback answers and the breaker opens
    assert q("first failure").headers["x-fibreflow-fallback"] == "upstream_error"
    assert q("while open").headers["x-fibreflow-fallback"] == "breaker_open"
    time.sleep(0.6)  # half-open: one trial may go
    hit = q("cached question")  # answered from the cache: it must not use up the trial
    assert hit.headers["x-fibreflow-cache"] == "hit" and "x-fibreflow-fallback" not in hit.headers
    flaky.mode = "slow"
    with pytest.raises(httpx.ReadTimeout):  # the trial's client leaves mid-call: the trial decides nothing
        httpx.post(f"{base}/v1/chat/completions", json={"model": "assistant", "user": "u1", "max_tokens": 4,
                   "messages": [{"role": "user", "content": "gone"}]}, timeout=0.3)  # fmt: skip
    time.sleep(0.1)
    flaky.mode = "ok"
    back = q("after the outage")
    assert back.status_code == 200 and "x-fibreflow-fallback" not in back.headers  # the trial went, closed it
    assert back.json()["choices"][0]["message"]["content"] == "arm: after the outage"
    assert metric(base, "fibreflow_router_breaker_open", upstream="flaky") == 0
