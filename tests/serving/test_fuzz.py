"""Fuzzing with schemathesis: every operation of the router's OpenAPI schema, without a key and with a key of each
scope, data that fits the schema and data that does not; then the model server's schema. Never a response of 500
or more, and every error in OpenAI's shape.

The router stands in front of a fast fake upstream (what is fuzzed is the router, not generation); the model
server is fuzzed on the tiny Llama.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from servers import Served
from serving_helpers import bearer, guarded, new_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCOPES = ("chat", "qa", "admin", "metrics")
CALLERS = ("no key", *SCOPES)
EXAMPLES = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def fake_upstream() -> FastAPI:
    """Answers any model at once, streamed or not, with usage: the router's behaviour is what is fuzzed."""
    import orjson

    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": []}

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def answer(body: dict[str, Any]) -> Any:
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "text": "ok", "finish_reason": "stop"}
        if body.get("stream"):
            chunk = {"id": "chatcmpl-f", "choices": [{"index": 0, "delta": {"content": "ok"}}]}
            last = {"id": "chatcmpl-f", "choices": [], "usage": usage}
            events = [b"data: " + orjson.dumps(x) + b"\n\n" for x in (chunk, last)] + [b"data: [DONE]\n\n"]
            return StreamingResponse(iter(events), media_type="text/event-stream")
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "model": body.get("model"),
                "choices": [choice], "usage": usage}  # fmt: skip

    return app


@pytest.fixture(scope="module")
def fuzz_db(embedded_admin: str, embedded_template: str) -> Iterator[str]:
    """A copy of the embedded (seeded, embedded) database for this module: keys, audit, frontend data."""
    name = f"fuzz_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(embedded_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{embedded_template}"')
    yield psycopg.conninfo.make_conninfo(embedded_admin, dbname=name)
    with psycopg.connect(embedded_admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def fuzzed_router(fuzz_db: str) -> Iterator[tuple[str, Any, dict[str, str | None]]]:
    """(base URL, app, caller -> key) of a router with keys, limits and audit on."""
    from fibreflow.core.db import migrate
    from fibreflow.serving.router import create_app

    with psycopg.connect(fuzz_db, autocommit=True) as conn:
        migrate(conn)
    upstream = Served(fake_upstream())
    limits = {"requests_per_minute": None, "tokens_per_minute": None}
    cfg = guarded(upstream.url, limits=limits, fibreflow={"model": "assistant", "k": 2})
    app = create_app(cfg, redis_url="", database_url=fuzz_db, watch=False)
    router = Served(app)
    keys: dict[str, str | None] = {"no key": None} | {s: new_key(fuzz_db, (s,)) for s in SCOPES}
    yield router.url, app, keys
    router.stop()
    upstream.stop()


@pytest.fixture(scope="module")
def router_schema(fuzzed_router: tuple[str, Any, dict[str, str | None]]) -> Any:
    base, app, _ = fuzzed_router
    schema = schemathesis.openapi.from_dict(app.openapi())  # served at /openapi.json only with docs: true
    schema.config.update(base_url=base)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return schema


def openai_shaped(response: Any) -> None:
    said = f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text[:500]}"
    assert response.status_code < 500, said
    if response.status_code >= 400:
        error = response.json().get("error") if response.text.startswith("{") else None
        assert isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"], said
        assert isinstance(error.get("type"), str), said


def fuzz(schema: Any, send: Any) -> int:
    """Every operation of `schema`, data that fits it and data that does not: `send(case)` checks each answer.
    Returns how many operations were fuzzed."""
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @EXAMPLES
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                send(case)

            try:
                check()
            except Unsatisfiable:  # an operation without inputs (GET /health) has no invalid ones to send
                assert mode == GenerationMode.NEGATIVE, operation.label
    return len(operations)


def test_no_input_reaches_a_500_on_the_router(
    router_schema: Any, fuzzed_router: tuple[str, Any, dict[str, str | None]]
) -> None:
    keys = fuzzed_router[2]

    def send(case: Any) -> None:
        for caller in CALLERS:  # each generated request without a key, then with a key of each scope
            openai_shaped(case.call(headers=bearer(keys[caller]), timeout=30))

    assert fuzz(router_schema, send) >= 12  # every route: OpenAI, frontend, embeddings, feedback, admin, ops


def test_the_fuzzing_left_the_router_serving(fuzzed_router: tuple[str, Any, dict[str, str | None]]) -> None:
    base, _, keys = fuzzed_router
    r = httpx.post(f"{base}/v1/chat/completions", headers=bearer(keys["chat"]),
                   json={"model": "assistant", "messages": [{"role": "user", "content": "still there?"}]})  # fmt: skip
    assert r.status_code in (200, 404), r.text  # 404: the admin fuzzing may have removed the experiment


@pytest.fixture(scope="module")
def model_server_schema(tiny_llama: Any, two_adapters: dict[str, Any]) -> Iterator[Any]:
    from fibreflow.serving.engine import Engine
    from fibreflow.serving.model_server import create_model_app
    from fibreflow.training.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    engine = Engine(model, load_tokenizer(str(tiny_llama)), base_name="tiny", max_context=256, batch_wait_ms=5)
    for name, path in two_adapters.items():
        engine.load_adapter(name, str(path))
    app = create_model_app(engine, default_max_tokens=4, token="t0ken", adapter_roots=(two_adapters["alpha"],))
    served = Served(app)
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.config.update(base_url=served.url)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    yield schema
    served.stop()
    engine.close()


def test_no_input_reaches_a_500_on_the_model_server(model_server_schema: Any) -> None:
    def send(case: Any) -> None:
        openai_shaped(case.call(headers={"Authorization": "Bearer t0ken"}, timeout=60))

    assert fuzz(model_server_schema, send) >= 5
