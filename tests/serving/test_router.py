"""The router over real HTTP in front of the real local model server (tiny Llama, two adapters)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fibreflow.serving.model_server import create_model_app
from fibreflow.serving.router import create_app
from fibreflow.serving.routing import StickyWeighted
from serving_helpers import config, metric

MSG = [{"role": "user", "content": "What is a BOQ?"}]


@pytest.fixture
def router(upstream: str, run_app: Any, project_tmp: Path) -> str:
    return run_app(create_app(config(upstream), redis_url="", watch=False))


@pytest.mark.integration
def test_openai_sdk_through_the_router_gets_the_arms_answers(router: str, upstream: str) -> None:
    direct = openai.OpenAI(base_url=f"{upstream}/v1", api_key="none")
    via = openai.OpenAI(base_url=f"{router}/v1", api_key="none")
    expected = {
        arm: direct.chat.completions.create(model=m, messages=MSG, max_tokens=8, temperature=0)
        .choices[0]
        .message.content
        for arm, m in (("a", "alpha"), ("b", "beta"))
    }
    seen = set()
    for user in ("ann", "bob", "cy", "dee", "eve", "fay"):
        raw = via.chat.completions.with_raw_response.create(
            model="assistant", messages=MSG, max_tokens=8, temperature=0, user=user
        )
        arm = raw.headers["x-fibreflow-arm"]
        assert raw.headers["x-fibreflow-model-version"] == {"a": "alpha", "b": "beta"}[arm]
        assert raw.parse().choices[0].message.content == expected[arm]
        seen.add(arm)
        again = via.chat.completions.with_raw_response.create(
            model="assistant", messages=MSG, max_tokens=8, temperature=0, user=user
        )
        assert again.headers["x-fibreflow-arm"] == arm  # sticky
    assert seen == {"a", "b"}
    stream = via.chat.completions.create(
        model="assistant", messages=MSG, max_tokens=8, temperature=0, user="ann", stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    arm = StickyWeighted().pick(config(upstream).router.experiments[0], "ann", {"a", "b"})
    assert arm is not None and text == expected[arm.name]
    assert metric(router, "fibreflow_router_time_to_first_token_seconds_count", arm=arm.name) == 1
    assert metric(router, "fibreflow_router_requests_total", arm=arm.name, status="200") >= 2


@pytest.mark.integration
def test_langchain_chat_openai_works_unchanged(router: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{router}/v1", api_key="none", model="assistant", max_tokens=8, temperature=0)
    whole = llm.invoke("What is a BOQ?").content
    streamed = "".join(str(c.content) for c in llm.stream("What is a BOQ?"))
    assert isinstance(whole, str) and whole and streamed == whole


@pytest.mark.integration
def test_forced_arm_and_bad_requests(router: str) -> None:
    via = openai.OpenAI(base_url=f"{router}/v1", api_key="none", max_retries=0)
    for arm in ("a", "b"):
        raw = via.chat.completions.with_raw_response.create(
            model="assistant", messages=MSG, max_tokens=4, extra_headers={"x-fibreflow-arm": arm}
        )
        assert raw.headers["x-fibreflow-arm"] == arm
    with pytest.raises(openai.BadRequestError, match="arm 'zz'"):
        via.chat.completions.create(model="assistant", messages=MSG, extra_headers={"x-fibreflow-arm": "zz"})
    with pytest.raises(openai.NotFoundError, match="`nope` does not exist"):
        via.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):  # the upstream's 400, passed on
        via.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "pole " * 1100}])
    bad = httpx.post(f"{router}/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "request body is not valid JSON"
    assert (
        httpx.post(f"{router}/v1/chat/completions", json={"model": "assistant"}).json()["error"]["param"] == "messages"
    )
    big = httpx.post(
        f"{router}/v1/chat/completions",
        json={"model": "assistant", "messages": [{"role": "user", "content": "x" * 1_100_000}]},
    )
    assert big.status_code == 413 and "over the limit" in big.json()["error"]["message"]


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_cache_hits_by_normalised_request_and_model_version(
    upstream: str, run_app: Any, project_tmp: Path, backend: str
) -> None:
    import redis

    url = "redis://127.0.0.1:6379/15" if backend == "redis" else ""
    if url:
        redis.Redis.from_url(url).flushdb()
    base = run_app(create_app(config(upstream), redis_url=url, watch=False))
    h = {"x-fibreflow-arm": "a"}
    q = {"model": "assistant", "max_tokens": 6, "temperature": 0}
    first = httpx.post(f"{base}/v1/chat/completions", json=q | {"messages": MSG}, headers=h)
    again = httpx.post(
        f"{base}/v1/chat/completions",
        headers=h,
        json=q | {"messages": [{"role": "user", "content": "  what is a   boq? "}]},
    )
    assert (first.headers["x-fibreflow-cache"], again.headers["x-fibreflow-cache"]) == ("miss", "hit")
    assert again.json() == first.json()
    other_arm = httpx.post(f"{base}/v1/chat/completions", json=q | {"messages": MSG}, headers={"x-fibreflow-arm": "b"})
    assert other_arm.headers["x-fibreflow-cache"] == "miss"  # another model version: its own entry
    sampled = httpx.post(f"{base}/v1/chat/completions", json=q | {"messages": MSG, "temperature": 0.7}, headers=h)
    assert sampled.headers["x-fibreflow-cache"] == "bypass"
    assert metric(base, "fibreflow_router_cache_total", arm="a", result="hit") == 1
    if url:  # the entries live in Redis with the boq_calculations TTL (600 s)
        keys = redis.Redis.from_url(url).keys("ff:cache:*")
        assert len(keys) == 2 and 0 < redis.Redis.from_url(url).ttl(keys[0]) <= 600


@pytest.mark.integration
def test_redis_down_serves_without_cache_and_says_so(upstream: str, run_app: Any, project_tmp: Path) -> None:
    base = run_app(create_app(config(upstream), redis_url="redis://127.0.0.1:1/0", watch=False))
    for _ in range(2):
        r = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "assistant", "messages": MSG, "max_tokens": 4, "temperature": 0},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    assert metric(base, "fibreflow_router_cache_backend_up", backend="redis") == 0
    assert sum(metric(base, "fibreflow_router_cache_total", arm=a, result="error") for a in "ab") >= 2


@pytest.mark.integration
def test_shadow_answers_are_logged_and_scored_never_returned(upstream: str, run_app: Any, project_tmp: Path) -> None:
    cfg = config(upstream)
    exp = cfg.router.experiments[0].model_copy(update={"shadow": "b"})
    arms = [a.model_copy(update={"weight": 1.0 if a.name == "a" else 0.0}) for a in exp.arms]
    cfg = cfg.model_copy(
        update={"router": cfg.router.model_copy(update={"experiments": [exp.model_copy(update={"arms": arms})]})}
    )
    base = run_app(create_app(cfg, redis_url="", watch=False))
    direct = openai.OpenAI(base_url=f"{upstream}/v1", api_key="none")
    q = [{"role": "user", "content": f"Tell me about pole {i}"} for i in range(3)]
    want = {
        i: {
            m: direct.chat.completions.create(model=m, messages=[q[i]], max_tokens=8, temperature=0)
            .choices[0]
            .message.content
            for m in ("alpha", "beta")
        }
        for i in range(3)
    }
    assert any(w["alpha"] != w["beta"] for w in want.values())
    via = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
    for i in range(3):
        got = via.chat.completions.with_raw_response.create(
            model="assistant", messages=[q[i]], max_tokens=8, temperature=0
        )
        assert got.headers["x-fibreflow-arm"] == "a"
        assert got.parse().choices[0].message.content == want[i]["alpha"]
    log = project_tmp / "var/serving/shadow.jsonl"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.1)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["answer"] for r in records) == sorted(w["beta"] for w in want.values())
    assert all(r["arm"] == "b" and 0 <= r["similarity"] <= 1 for r in records)
    assert metric(base, "fibreflow_router_shadow_total", arm="b", outcome="ok") == 3


@pytest.mark.integration
def test_upstream_down_is_a_clear_502(run_app: Any, project_tmp: Path) -> None:
    dead = run_app(create_app(config("http://127.0.0.1:9"), redis_url="", watch=False))
    down = httpx.post(f"{dead}/v1/chat/completions", json={"model": "assistant", "messages": MSG})
    assert down.status_code == 502 and "unreachable" in down.json()["error"]["message"]
    assert sum(metric(dead, "fibreflow_router_upstream_retries_total", arm=a) for a in "ab") == 1


@pytest.mark.integration
def test_tools_and_other_fields_pass_through_to_the_upstream(run_app: Any, project_tmp: Path) -> None:
    """An upstream that records what it receives (as vLLM would get it) and answers with a tool call."""

    seen: list[dict[str, Any]] = []
    fake = FastAPI()

    @fake.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        seen.append(await request.json())
        call = {"id": "call_1", "type": "function", "function": {"name": "project_status", "arguments": "{}"}}
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": seen[-1]["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }

    base = run_app(create_app(config(run_app(fake)), redis_url="", watch=False))
    tool = {
        "type": "function",
        "function": {"name": "project_status", "parameters": {"type": "object", "properties": {}}},
    }
    via = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
    out = via.chat.completions.create(
        model="assistant",
        messages=MSG,
        tools=[tool],
        tool_choice="auto",
        response_format={"type": "json_object"},
        stop=["\n\n"],
        seed=7,
        logprobs=True,
        top_logprobs=2,
        temperature=0.3,
        user="ann",
    )
    assert out.choices[0].message.tool_calls[0].function.name == "project_status"
    got = seen[-1]
    assert got["model"] in ("alpha", "beta")  # renamed to what the upstream serves; everything else as sent
    assert got["tools"] == [tool] and got["tool_choice"] == "auto" and got["response_format"] == {"type": "json_object"}
    assert (got["stop"], got["seed"], got["logprobs"], got["top_logprobs"]) == (["\n\n"], 7, True, 2)


@pytest.mark.integration
def test_cors_headers_on_the_fast_path_and_preflight(upstream: str, run_app: Any, project_tmp: Path) -> None:
    base = run_app(
        create_app(config(upstream, cors_origins=["https://app.fibreflow.example"]), redis_url="", watch=False)
    )
    origin = {"Origin": "https://app.fibreflow.example"}
    pre = httpx.options(f"{base}/v1/chat/completions", headers=origin | {"Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.fibreflow.example"
    r = httpx.post(
        f"{base}/v1/chat/completions", headers=origin, json={"model": "assistant", "messages": MSG, "max_tokens": 4}
    )
    assert r.headers["access-control-allow-origin"] == "https://app.fibreflow.example"
    assert "x-fibreflow-arm" in r.headers["access-control-expose-headers"]
    other = httpx.post(
        f"{base}/v1/chat/completions",
        headers={"Origin": "https://evil.example"},
        json={"model": "assistant", "messages": MSG, "max_tokens": 4},
    )
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.integration
def test_openai_sdk_and_langchain_with_the_bundled_model(bundled_base: Path, run_app: Any, project_tmp: Path) -> None:
    """The real bundled SmolLM2-135M-Instruct behind the local model server, the router in front."""
    from fibreflow.core.config import torch_dtype
    from fibreflow.serving.engine import Engine
    from fibreflow.training.models import load_tokenizer
    from langchain_openai import ChatOpenAI
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bundled_base, dtype=torch_dtype("auto")).eval()
    engine = Engine(model, load_tokenizer(str(bundled_base)), base_name="smollm2", max_context=2048)
    try:
        upstream = run_app(create_model_app(engine, default_max_tokens=24))
        arms = [{"name": "base", "upstream": "local", "model": "smollm2", "weight": 1}]
        cfg = config(upstream, experiments=[{"model": "fibreflow-assistant", "salt": "s", "arms": arms}])
        base = run_app(create_app(cfg, redis_url="", watch=False))
        question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        answer = sdk.chat.completions.create(
            model="fibreflow-assistant", messages=question, max_tokens=24, temperature=0
        )
        assert "paris" in answer.choices[0].message.content.lower()  # a real model, not random weights
        streamed = sdk.chat.completions.create(
            model="fibreflow-assistant", messages=question, max_tokens=24, temperature=0, stream=True
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            == answer.choices[0].message.content
        )
        llm = ChatOpenAI(
            base_url=f"{base}/v1", api_key="none", model="fibreflow-assistant", max_tokens=24, temperature=0
        )
        assert llm.invoke(question[0]["content"]).content == answer.choices[0].message.content
        assert "".join(str(c.content) for c in llm.stream(question[0]["content"])) == answer.choices[0].message.content
    finally:
        engine.close()


@pytest.mark.integration
def test_shadow_copies_in_flight_are_bounded(upstream: str, run_app: Any, project_tmp: Path) -> None:
    """A slow shadow arm cannot pile up copies: past `shadow_concurrency` they are dropped (counted); answers are
    unaffected."""
    import asyncio

    slow = FastAPI()

    @slow.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(2)
        return {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "late"}}]}

    arms = [{"name": "a", "upstream": "local", "model": "alpha", "weight": 1},
            {"name": "s", "upstream": "slow", "model": "beta", "weight": 0}]  # fmt: skip
    cfg = config(upstream, shadow_concurrency=2, cache={"enabled": False},
                 upstreams={"local": {"url": f"{upstream}/v1"}, "slow": {"url": f"{run_app(slow)}/v1"}},
                 experiments=[{"model": "assistant", "salt": "s", "arms": arms, "shadow": "s"}])  # fmt: skip
    base = run_app(create_app(cfg, redis_url="", watch=False))
    for i in range(6):
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": "assistant", "max_tokens": 2,
                       "messages": [{"role": "user", "content": f"q{i}"}]})  # fmt: skip
        assert r.status_code == 200 and r.headers["x-fibreflow-arm"] == "a"
    assert metric(base, "fibreflow_router_shadow_dropped_total", arm="s") == 4  # 2 in flight, 4 dropped
