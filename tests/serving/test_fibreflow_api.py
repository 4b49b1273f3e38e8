"""The frontend's endpoints and /v1/embeddings against the real embedded database (seeded, embedded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import psycopg
import pytest
from fibreflow.datasets.config import load_data_config
from fibreflow.datasets.facts import health as facts_health
from fibreflow.serving.model_server import create_model_app
from fibreflow.serving.router import create_app
from serving_helpers import config, metric


@pytest.fixture
def api(embedded_url: str, tiny_engine: Any, run_app: Any, project_tmp: Path) -> str:
    upstream = run_app(create_model_app(tiny_engine, default_max_tokens=8))
    cfg = config(upstream, fibreflow={"model": "assistant", "k": 3}).model_copy(update={"max_new_tokens": 8})
    return run_app(create_app(cfg, redis_url="", database_url=embedded_url, watch=False))


def recording(app: Any, bodies: list[dict[str, Any]]) -> Any:
    """`app` (ASGI), keeping every request's JSON body: what the router sent the model."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        head = [await receive()]
        while head[-1].get("more_body"):
            head.append(await receive())
        body = b"".join(m.get("body", b"") for m in head)
        if body:
            bodies.append(json.loads(body))

        async def replay() -> Any:
            return head.pop(0) if head else await receive()

        return await app(scope, replay, send)

    return asgi


@pytest.fixture
def tool_api(embedded_url: str, tool_upstream: str, run_app: Any, project_tmp: Path) -> str:
    from serving_helpers import tool_config

    cfg = tool_config(tool_upstream, fibreflow={"model": "assistant", "k": 3, "max_steps": 2},
                      audit={"enabled": True, "flush_s": 0.1})  # fmt: skip
    return run_app(create_app(cfg, redis_url="", database_url=embedded_url, watch=False))


@pytest.mark.integration
def test_ask_runs_the_tool_loop_on_the_records(tool_api: str, embedded_url: str, embedder: Any) -> None:
    """The model (tests/toolchat.py) calls a tool, the records answer in SQL, the model answers: the response has
    every call with its arguments and record ids (or its error), bounded by the request's filters."""
    from fibreflow.datasets.retrieval import Filters, Retriever
    from serving_helpers import audit_rows
    from toolchat import ARGS, QUESTION, SEARCH_ARGS, SEARCH_QUESTION

    with psycopg.connect(embedded_url, autocommit=True) as conn:
        projects = [r[0] for r in conn.execute("SELECT id FROM projects ORDER BY id")]
        project = projects[0]
        want = Retriever(embedder, "record_embeddings").search(conn, SEARCH_ARGS["query"], 3,
                                                               Filters(project_id=project))  # fmt: skip
    r = httpx.post(f"{tool_api}/v1/fibreflow/ask", json={"question": QUESTION}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    first = out["tool_calls"][0]
    assert first["name"] == "pole_counts" and 1 <= out["steps"] <= 2 and isinstance(out["answer"], str)
    if "PRJ-0003" in projects:
        assert first["arguments"] == ARGS and first["record_ids"] == ["PRJ-0003"] and first["error"] is None
    else:  # the tool's error went back to the model, which still answered
        assert first["record_ids"] == [] and first["error"].startswith("no project PRJ-0003; closest projects:")
    in_project = {"question": QUESTION, "filters": {"project_id": project}}
    scoped = httpx.post(f"{tool_api}/v1/fibreflow/ask", json=in_project, timeout=60).json()
    assert scoped["tool_calls"][0]["arguments"] == ARGS | {"project_id": project}  # the filter bounds the call
    assert scoped["tool_calls"][0]["record_ids"] == [project] and scoped["record_ids"][0] == project
    assert out["arm"] == "a" and out["response_id"]
    search = httpx.post(f"{tool_api}/v1/fibreflow/ask", json={"question": SEARCH_QUESTION, "filters":
                                                             {"project_id": project}}, timeout=60).json()  # fmt: skip
    assert search["tool_calls"][0]["name"] == "search_records"
    assert search["tool_calls"][0]["record_ids"] == [h.record_id for h in want]  # k from the config, the filter
    rows = audit_rows(embedded_url, 3)
    assert all(r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 for r in rows)  # every turn's tokens
    bad = httpx.post(f"{tool_api}/v1/fibreflow/ask", json={"question": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "question"


@pytest.mark.integration
def test_project_summary_and_health_rest_on_computed_facts_and_are_cached(
    embedded_url: str, tiny_engine: Any, run_app: Any, project_tmp: Path
) -> None:
    """The model gets the conversation it was trained on with the project_status call already made (the records'
    answer in its tool turn), not a prompt of its own; the health rating is the facts' rule."""
    from fibreflow.datasets.assistant import conversation
    from fibreflow.datasets.tools import run_tool, schemas

    bodies: list[dict[str, Any]] = []
    upstream = run_app(recording(create_model_app(tiny_engine, default_max_tokens=8), bodies))
    cfg = config(upstream, fibreflow={"model": "assistant", "k": 3}).model_copy(update={"max_new_tokens": 8})
    api = run_app(create_app(cfg, redis_url="", database_url=embedded_url, watch=False))
    with psycopg.connect(embedded_url, autocommit=True) as conn:
        project, n_tasks = conn.execute(
            "SELECT p.id, count(t.id) FROM projects p JOIN tasks t ON t.project_id = p.id GROUP BY p.id LIMIT 1"
        ).fetchone()
        status = run_tool(conn, "project_status", {"project_id": project})
    first = httpx.get(f"{api}/v1/fibreflow/projects/{project}/summary", timeout=60)
    assert first.status_code == 200, first.text
    out = first.json()
    facts = out["facts"]
    assert sum(facts["tasks_by_status"].values()) == n_tasks and facts["project"]["id"] == project
    assert facts["as_of"] == "2026-10-31"  # the demo data's date, not today's
    assert out["tool_calls"][0] == {"name": "project_status", "arguments": {"project_id": project},
                                    "written": json.dumps({"project_id": project}), "record_ids": [project],
                                    "error": None}  # fmt: skip
    trained = conversation(load_data_config().system_prompt, f"Summarise project {project} for me.",
                           "project_status", {"project_id": project}, status, "")[:4]  # fmt: skip
    sent = bodies[0]["messages"]
    assert [(m["role"], m.get("content")) for m in sent] == [(m["role"], m["content"]) for m in trained]
    assert sent[2]["tool_calls"][0]["function"] == trained[2]["tool_calls"][0]["function"]
    assert bodies[0]["tools"] == schemas() and bodies[0]["tool_choice"] == "auto"
    again = httpx.get(f"{api}/v1/fibreflow/projects/{project}/summary", timeout=60).json()
    assert (out["cache"], again["cache"]) == ("miss", "hit") and again["answer"] == out["answer"]
    health = httpx.get(f"{api}/v1/fibreflow/projects/{project}/health", timeout=60)
    assert health.status_code == 200 and health.json()["kind"] == "health"
    assert health.json()["health"] == facts_health(facts)
    missing = httpx.get(f"{api}/v1/fibreflow/projects/NOPE-1/summary")
    assert missing.status_code == 404 and "no project 'NOPE-1'" in missing.json()["error"]["message"]


@pytest.mark.integration
def test_embeddings_are_the_bundled_models_with_cache_and_space_checks(api: str, embedder: Any) -> None:
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="none", max_retries=0)
    name = embedder.spec.name
    texts = ["pole planted on Main Street", "BOQ total for trenching"]
    got = client.embeddings.with_raw_response.create(model=name, input=texts)  # the SDK asks for base64
    assert got.headers["x-fibreflow-embedding-dim"] == "384"
    vectors = np.array([d.embedding for d in got.parse().data], dtype=np.float32)
    assert np.allclose(vectors, embedder.encode(texts), atol=1e-5)
    as_floats = httpx.post(f"{api}/v1/embeddings", json={"model": name, "input": texts[0],
                                                         "encoding_format": "float"}).json()  # fmt: skip
    assert np.allclose(as_floats["data"][0]["embedding"], vectors[0], atol=1e-5) and as_floats["dimensions"] == 384
    assert metric(api, "fibreflow_router_cache_total", arm="embeddings", result="hit") == 1
    with pytest.raises(openai.NotFoundError, match="must never be mixed"):
        client.embeddings.create(model="BAAI/bge-large-en-v1.5", input="x")
    with pytest.raises(openai.BadRequestError, match="384-d vectors, not 1024"):
        client.embeddings.create(model=name, input="x", dimensions=1024)


@pytest.mark.integration
def test_embeddings_reach_redis_once_per_request_however_many_texts(
    tiny_engine: Any, run_app: Any, project_tmp: Path
) -> None:
    """One MGET for the lookups and one pipelined write for the new vectors (not a round trip per text)."""
    import redis

    url = "redis://127.0.0.1:6379/14"
    r = redis.Redis.from_url(url)
    r.flushdb()
    upstream = run_app(create_model_app(tiny_engine, default_max_tokens=8))
    unlimited = {"requests_per_minute": None, "tokens_per_minute": None}  # only the cache talks to Redis
    base = run_app(create_app(config(upstream, limits=unlimited), redis_url=url, watch=False))

    def calls() -> dict[str, int]:
        stats = r.info("commandstats")
        return {c: stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("get", "mget", "set")}

    texts = [f"pole {i} planted on Main Street" for i in range(20)]
    before = calls()
    first = httpx.post(f"{base}/v1/embeddings", json={"model": "default", "input": texts}, timeout=60)
    assert first.status_code == 200 and first.headers["x-fibreflow-embedding-dim"] == "384"
    after = calls()
    assert (after["mget"] - before["mget"], after["get"] - before["get"]) == (1, 0)
    assert after["set"] - before["set"] == 20  # pipelined: one round trip
    again = httpx.post(f"{base}/v1/embeddings", json={"model": "default", "input": texts}, timeout=60)
    assert again.json()["data"] == first.json()["data"] and calls()["mget"] - after["mget"] == 1
