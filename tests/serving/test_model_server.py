"""The local model server over real HTTP: OpenAI SDK calls, streaming, batching, adapters, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fibreflow.serving.model_server import create_model_app

QUESTIONS = ["What is a BOQ?", "Define pole", "How far along is project 3?", "hi", "What does OTDR mean?", "x y z"]


def one_by_one(engine: Any, adapter: str | None, question: str, max_new_tokens: int = 8) -> str:
    """The reference: plain transformers generate for one conversation, with that adapter (or none)."""
    from fibreflow.eval.generate import generate_local

    model = engine.model
    conv = [{"role": "user", "content": question}]
    if adapter is None:
        with model.disable_adapter():
            return generate_local(
                model, engine.tok, [conv], batch_size=1, max_new_tokens=max_new_tokens, progress=False
            )[0]
    model.set_adapter(adapter)
    return generate_local(model, engine.tok, [conv], batch_size=1, max_new_tokens=max_new_tokens, progress=False)[0]


@pytest.fixture
def server(tiny_engine: Any, run_app: Any, two_adapters: dict[str, Path]) -> str:
    store = two_adapters["alpha"].parent  # stands in for the artifact store: adapters load only from there
    return run_app(create_model_app(tiny_engine, default_max_tokens=8, adapter_roots=(store,)))


@pytest.mark.integration
def test_models_lists_the_base_and_every_adapter(server: str, two_adapters: dict[str, Path]) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none")
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "alpha", "beta"}
    assert cards["alpha"].model_extra["parent"] == "tiny"
    assert cards["tiny"].model_extra["max_model_len"] == 1024


@pytest.mark.integration
def test_concurrent_requests_are_batched_and_answer_as_one_by_one(server: str, tiny_engine: Any) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none")
    jobs = [(q, model) for q in QUESTIONS for model in ("tiny", "alpha", "beta")]

    async def ask(q: str, model: str) -> Any:
        return await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], max_tokens=8, temperature=0
        )

    async def all_() -> list[Any]:
        return await asyncio.gather(*(ask(q, m) for q, m in jobs))

    batches, rows = tiny_engine.batches, tiny_engine.rows
    outs = asyncio.run(all_())
    assert tiny_engine.rows - rows > 2 * (tiny_engine.batches - batches)  # rows shared their forward passes
    got = {(q, m): o.choices[0].message.content.strip() for (q, m), o in zip(jobs, outs, strict=True)}
    for q, m in jobs:
        assert got[(q, m)] == one_by_one(tiny_engine, None if m == "tiny" else m, q), (q, m)
    assert len({got[(q, "alpha")] for q in QUESTIONS} ^ {got[(q, "beta")] for q in QUESTIONS}) > 0  # adapters differ
    usage = outs[0].usage
    assert usage.completion_tokens <= 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.integration
def test_requests_join_the_running_batch_and_answer_as_one_by_one(server: str, tiny_engine: Any) -> None:
    """Continuous batching: short questions sent while a long answer is generating join it at the next step and
    finish while it still runs (a static batch would hold them until it ended), each answering exactly as alone,
    the long one too, though its cache was re-padded for every newcomer."""
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none")

    def ask(q: str, model: str, n: int) -> Any:
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=n,
                                              temperature=0)  # fmt: skip

    async def scenario() -> tuple[Any, list[Any], float, float]:
        long = asyncio.create_task(ask("Tell me everything about pole permissions", "alpha", 600))
        while tiny_engine.tokens < 20:  # the long answer is being generated
            await asyncio.sleep(0.01)
        shorts = []
        for q, model in zip(QUESTIONS, ("tiny", "beta", "alpha", "beta", "tiny", "alpha"), strict=True):
            shorts.append(asyncio.create_task(ask(q, model, 8)))
            await asyncio.sleep(0.02)  # arriving one by one, at different steps
        done = await asyncio.gather(*shorts)
        shorts_end = asyncio.get_running_loop().time()
        whole = await long
        return whole, done, shorts_end, asyncio.get_running_loop().time()

    whole, shorts, shorts_end, long_end = asyncio.run(scenario())
    assert whole.usage.completion_tokens > 300  # long enough to tell the two batchings apart
    assert long_end - shorts_end > 0.2  # the short ones did not wait for it
    models = ("tiny", "beta", "alpha", "beta", "tiny", "alpha")
    for q, model, out in zip(QUESTIONS, models, shorts, strict=True):
        assert out.choices[0].message.content.strip() == one_by_one(tiny_engine, None if model == "tiny" else model, q)
    alone = one_by_one(tiny_engine, "alpha", "Tell me everything about pole permissions", max_new_tokens=600)
    assert whole.choices[0].message.content.strip() == alone


@pytest.mark.integration
def test_streaming_gives_the_same_text_with_usage(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none")
    kw: dict[str, Any] = {
        "model": "alpha",
        "messages": [{"role": "user", "content": "What is a BOQ?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


@pytest.mark.integration
def test_completions_stop_strings_and_length(server: str, tiny_engine: Any) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none")
    full = client.completions.create(model="tiny", prompt="The pole", max_tokens=12, temperature=0)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    text = full.choices[0].text
    stop = text.strip().split()[1]  # a word from the middle of the greedy answer
    cut = client.completions.create(model="tiny", prompt="The pole", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.find(stop)]


@pytest.mark.integration
def test_adapters_load_and_unload_at_run_time(server: str, two_adapters: dict[str, Path]) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none")
    ok = httpx.post(
        f"{server}/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(two_adapters["alpha"])}
    )
    assert ok.status_code == 200
    same = [
        client.chat.completions.create(
            model=m, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
        )
        .choices[0]
        .message.content
        for m in ("alpha", "gamma")
    ]
    assert same[0] == same[1]
    assert httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
    with pytest.raises(openai.NotFoundError, match="gamma"):
        client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}])
    bad = httpx.post(
        f"{server}/v1/load_lora_adapter",
        json={"lora_name": "delta", "lora_path": str(two_adapters["alpha"].parent / "nonexistent")},
    )
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    for outside in ("/tmp", "/", str(two_adapters["alpha"]) + "/../../.."):  # any other folder: refused
        refused = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": outside})
        assert refused.status_code == 403 and "artifact store" in refused.json()["error"]["message"], outside
    assert "evil" not in {m.id for m in client.models.list().data}


@pytest.mark.integration
def test_bad_requests_get_openai_errors(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=msgs)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "pole " * 1100}])
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(model="tiny", messages=msgs, n=2)
    with pytest.raises(openai.BadRequestError, match="functions is not supported"):
        fn = {"name": "f", "parameters": {"type": "object", "properties": {}}}
        client.chat.completions.create(model="tiny", messages=msgs, functions=[fn])
    raw = httpx.post(
        f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and raw.json()["error"]["message"] == "request body is not valid JSON"
    missing = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"


@pytest.mark.integration
def test_the_upstream_token_guards_every_v1_route(
    tiny_engine: Any, run_app: Any, project_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like vLLM's --api-key: without the shared token no process can generate, list or (un)load adapters."""
    from fibreflow.serving.router import create_app
    from serving_helpers import config

    server = run_app(create_model_app(tiny_engine, default_max_tokens=4, token="s3cret"))
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, path, body in (
        ("POST", "/v1/chat/completions", chat),
        ("GET", "/v1/models", None),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "alpha"}),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, f"{server}{path}", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
    assert "alpha" in tiny_engine.adapters  # nothing was unloaded
    assert httpx.get(f"{server}/health").status_code == 200  # probes need no token
    ok = httpx.post(f"{server}/v1/chat/completions", json=chat, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "s3cret")  # the router sends the token it is given
    cfg = config(server, upstreams={"local": {"url": f"{server}/v1", "api_key_env": "TEST_UPSTREAM_KEY"}})
    router = run_app(create_app(cfg, redis_url="", watch=False))
    via = httpx.post(f"{router}/v1/chat/completions", json=chat | {"model": "assistant"})
    assert via.status_code == 200, via.text


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a real /metrics scrape, by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


@pytest.mark.integration
def test_metrics_count_what_was_served(tiny_engine: Any, run_app: Any) -> None:
    """/metrics (outside /v1: no token, like vLLM's) agrees with the answers: requests by model and finish reason,
    prompt and completion tokens, one queue wait per request, the rows of every batch, nothing left running."""
    server = run_app(create_model_app(tiny_engine, default_max_tokens=8, token="s3cret"))
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="s3cret")
    jobs = [(q, m, n) for q in QUESTIONS for m, n in (("tiny", 1), ("alpha", 6), ("beta", 9))]

    async def all_() -> list[Any]:
        return await asyncio.gather(*(
            client.chat.completions.create(model=m, messages=[{"role": "user", "content": q}], max_tokens=n,
                                           temperature=0)
            for q, m, n in jobs
        ))  # fmt: skip

    outs = asyncio.run(all_())
    s = scrape(server)
    p = "fibreflow_model_"
    for model in ("tiny", "alpha", "beta"):
        mine = [o for (_, m, _), o in zip(jobs, outs, strict=True) if m == model]
        for reason in ("stop", "length"):
            want = sum(o.choices[0].finish_reason == reason for o in mine)
            assert total(s, p + "requests_total", model=model, reason=reason) == want, (model, reason)
        assert total(s, p + "generation_tokens_total", model=model) == sum(o.usage.completion_tokens for o in mine)
        assert total(s, p + "prompt_tokens_total", model=model) == sum(o.usage.prompt_tokens for o in mine)
        assert total(s, p + "queue_wait_seconds_count", model=model) == len(mine)
        assert total(s, p + "time_to_first_token_seconds_count", model=model) == len(mine)
        assert total(s, p + "time_per_output_token_seconds_count", model=model) == sum(
            o.usage.completion_tokens > 1 for o in mine
        )
    assert total(s, p + "batch_size_sum") == tiny_engine.rows > total(s, p + "batch_size_count") == tiny_engine.batches
    assert total(s, p + "requests_running") == 0 and total(s, p + "requests_waiting") == 0
