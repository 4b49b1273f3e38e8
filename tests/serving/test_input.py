"""Hostile and malformed input: 4xx naming the field, never a 500; the key checked before any body is read; one
size limit on every route, whether the body declares its length, declares none (chunked) or lies about it."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from fibreflow.serving.router import create_app
from serving_helpers import MSG, audit_rows, bearer, config, guarded, new_key

pytestmark = pytest.mark.integration

BAD_FIELDS = [
    ({"temperature": "abc"}, "temperature"),
    ({"temperature": [1]}, "temperature"),
    ({"temperature": {"x": 1}}, "temperature"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"stop": [1, 2]}, "stop"),
    ({"n": "2"}, "n"),
    ({"user": 5}, "user"),
    ({"seed": 1.5}, "seed"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"stream_options": "x"}, "stream_options"),
    ({"tools": "x"}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {
            "tools": [{"type": "function", "function": {"name": "a"}}],
            "tool_choice": {"type": "function", "function": {"name": "b"}},
        },
        "tool_choice",
    ),
    (
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "a", "arguments": {}}}]}]},
        "messages.0.tool_calls.0.function.arguments",
    ),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [1, 2]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [None]}, "messages.0"),
    ({"model": 7}, "model"),
]


@pytest.fixture
def open_router(upstream: str, run_app: Any, project_tmp: Path) -> str:
    return run_app(create_app(config(upstream), redis_url="", watch=False))


@pytest.mark.parametrize(("change", "param"), BAD_FIELDS, ids=[p for _, p in BAD_FIELDS])
def test_wrongly_typed_fields_are_400s_naming_the_field(
    change: dict[str, Any], param: str, open_router: str, upstream: str
) -> None:
    body = {"model": "assistant", "messages": MSG, "max_tokens": 4} | change
    for base, model in ((open_router, "assistant"), (upstream, "alpha")):  # the router, and the model server itself
        r = httpx.post(f"{base}/v1/chat/completions", json=body | ({"model": model} if "model" not in change else {}))
        assert r.status_code == 400, (base, r.text)
        error = r.json()["error"]
        assert error["param"].startswith(param) and error["type"] == "invalid_request_error", (base, error)


def test_input_the_model_server_cannot_serve_is_refused_by_it_not_retried(
    open_router: str, upstream: str, run_app: Any, project_tmp: Path
) -> None:
    """Valid for the API but not for a text model: the upstream's 400 passes through, nothing is retried."""
    from serving_helpers import metric

    image = [{"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}}]
    for change, param in (
        ({"messages": [{"role": "user", "content": image}]}, "messages.0.content"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
            "response_format.json_schema",
        ),
        ({"prompt": []}, "prompt"),
    ):
        path = "completions" if "prompt" in change else "chat/completions"
        body = {"model": "assistant", "max_tokens": 4} | ({} if "prompt" in change else {"messages": MSG}) | change
        r = httpx.post(f"{open_router}/v1/{path}", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert sum(metric(open_router, "fibreflow_router_upstream_retries_total", arm=a) for a in "ab") == 0


def test_non_json_and_non_objects(open_router: str) -> None:
    for raw, message in ((b"{oops", "not valid JSON"), (b"[1, 2]", "JSON object"), (b'"x"', "JSON object")):
        r = httpx.post(f"{open_router}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/fibreflow/ask"),
    ("POST", "/v1/feedback"),
    ("PUT", "/admin/experiments/assistant"),
]
BIG = 2_000_000  # over the 1,000,000-byte limit


def chunked(size: int) -> Any:
    """A body sent with Transfer-Encoding: chunked (no Content-Length)."""

    def parts() -> Any:
        sent = 0
        while sent < size:
            yield b"x" * 65536
            sent += 65536

    return parts()


def lying(base: str, path: str, key: str, declared: int, body: bytes) -> bytes:
    """A raw request whose Content-Length is not the body's length; returns what came back."""
    url = urlparse(base)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(head.encode() + body)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_one_size_limit_on_every_route_and_the_key_before_the_body(
    keys_db: str, upstream: str, run_app: Any, project_tmp: Path
) -> None:
    base = run_app(create_app(guarded(upstream), redis_url="", database_url=keys_db, watch=False))
    admin = new_key(keys_db, ("chat", "admin"))
    for method, path in ROUTES:
        # no key: refused before a byte of the body is parsed (a broken body would otherwise be a 400)
        r = httpx.request(method, f"{base}{path}", content=b"{broken", headers={"content-type": "application/json"})
        assert r.status_code == 401, (path, r.text)
        # declared too long: refused from the header
        big = httpx.request(method, f"{base}{path}", content=b"x" * BIG, headers=bearer(admin))
        assert big.status_code == 413 and "over the limit" in big.json()["error"]["message"], (path, big.text)
        # chunked, no length declared: refused while reading
        streamed = httpx.request(method, f"{base}{path}", content=chunked(BIG), headers=bearer(admin))
        assert streamed.status_code == 413, (path, streamed.text)
        # a length that lies: the server reads what was declared, and that is not JSON
        answer = lying(base, path, admin, 20, b'{"model": "assistant", "messages": []}' * 1000)
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, (path, answer[:300])
    assert httpx.post(f"{base}/v1/chat/completions", json={"model": "assistant", "messages": MSG, "max_tokens": 4},
                      headers=bearer(admin)).status_code == 200  # fmt: skip
    statuses = [r["status"] for r in audit_rows(keys_db, 4 * len(ROUTES) + 1)]
    assert statuses.count(401) == len(ROUTES) and statuses.count(413) == 2 * len(ROUTES) and 500 not in statuses
