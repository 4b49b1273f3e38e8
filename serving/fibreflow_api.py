"""What the frontend calls besides the OpenAI API: grounded questions, templated project tasks, embeddings.

- `POST /v1/fibreflow/ask`: question (+ filters) -> top-k records from pgvector -> the assistant's answer with
  the record ids it was grounded on.
- `GET /v1/fibreflow/projects/{id}/summary` and `/health`: the project, its tasks, progress and history from the
  database -> a prompt whose long instruction prefix is the same for every project (vLLM's prefix cache reuses
  it) -> the answer, next to the computed facts; cached with the project_status TTL.
- `POST /v1/embeddings`: the self-hosted embedding model (OpenAI-compatible), with a per-text cache; the model
  name and dimension are reported so clients never mix vector spaces.
All go through the router's keys, limits, A/B, cache, metrics and audit like any chat call.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import threading
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fibreflow.serving.audit import Call
from fibreflow.serving.protocol import ApiError
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from fibreflow.serving.router import Router

CHAT = "/chat/completions"
INSTRUCTIONS = {  # the fixed prefix: identical for every project, the project's data comes after it
    "summary": "PROJECT SUMMARY. Summarise the FibreFlow project below for its project manager in 3-5 sentences: "
    "status, progress against the plan, open and blocked tasks, recent field activity. Use only the data given.",
    "health": "PROJECT HEALTH CHECK. Rate the FibreFlow project below green, amber or red and give the reasons in "
    "2-4 sentences: schedule (days left, share of tasks done), blockers and overdue tasks, and whether field "
    "progress in the last 7 days is up or down on the 7 days before. Use only the data given.",
}


class AskFilters(BaseModel):
    project_id: str | None = None
    region: str | None = None
    record_type: str | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None


class AskRequest(BaseModel):
    question: str = Field(min_length=1, max_length=4000)
    filters: AskFilters | None = None
    k: int | None = Field(default=None, ge=1, le=20)
    user: str | None = None


class EmbeddingsRequest(BaseModel):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class Resources:
    """The embedder and a database connection, loaded on first use and shared by the endpoints (one thread at
    a time: both are used from worker threads)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._lock = threading.Lock()
        self._embedder: Any = None
        self._conn: Any = None
        self._retriever: Any = None

    def embedder(self) -> Any:
        if self._embedder is None:
            from fibreflow.datasets.embedding import Embedder

            self._embedder = Embedder(self.router.rc.embeddings.model)
        return self._embedder

    def conn(self) -> Any:
        from fibreflow.core.db import connect, database_url, load_db_config

        if self._conn is None or self._conn.closed:
            self._conn = connect(self.router.database_url or database_url(load_db_config()))
        return self._conn

    def retrieve(self, question: str, k: int, filters: AskFilters | None) -> list[Any]:
        from fibreflow.datasets.embed import load_embed_config
        from fibreflow.datasets.retrieval import Filters, Retriever

        with self._lock:
            if self._retriever is None:
                cfg = load_embed_config()
                self._retriever = Retriever(self.conn(), self.embedder(), cfg.table, cfg.ef_search)
            return self._retriever.search(question, k, Filters(**(filters.model_dump() if filters else {})))

    def facts(self, project_id: str) -> dict[str, Any] | None:
        with self._lock:
            return project_facts(self.conn(), project_id)

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            return self.embedder().encode(texts)


def project_facts(conn: Any, project_id: str) -> dict[str, Any] | None:
    """The numbers a summary or health check rests on, computed in SQL (as of the data's date)."""
    as_of = conn.execute(
        "SELECT coalesce((SELECT (value->>'as_of')::date FROM fibreflow_meta WHERE key = 'data_source'), current_date)"
    ).fetchone()[0]
    p = conn.execute(
        "SELECT id, name, client, region, town, network_type, build_method, status, project_manager, start_date,"
        " target_end_date, homes_planned, budget_zar FROM projects WHERE id = %s",
        (project_id,),
    ).fetchone()
    if p is None:
        return None
    keys = (
        "id",
        "name",
        "client",
        "region",
        "town",
        "network_type",
        "build_method",
        "status",
        "project_manager",
        "start_date",
        "target_end_date",
        "homes_planned",
        "budget_zar",
    )
    project = dict(zip(keys, p, strict=True))
    tasks = dict(
        conn.execute(
            "SELECT status, count(*) FROM tasks WHERE project_id = %s GROUP BY status", (project_id,)
        ).fetchall()
    )
    blocked = [
        r[0]
        for r in conn.execute(
            "SELECT title FROM tasks WHERE project_id = %s AND status = 'blocked' ORDER BY due_date LIMIT 5",
            (project_id,),
        )
    ]
    overdue = conn.execute(
        "SELECT count(*) FROM tasks WHERE project_id = %s AND status <> 'done' AND due_date < %s", (project_id, as_of)
    ).fetchone()[0]
    week = conn.execute(
        "SELECT coalesce(sum(quantity) FILTER (WHERE report_date > %s - 7), 0),"
        " coalesce(sum(quantity) FILTER (WHERE report_date <= %s - 7 AND report_date > %s - 14), 0)"
        " FROM daily_progress WHERE project_id = %s AND report_date <= %s",
        (as_of, as_of, as_of, project_id, as_of),
    ).fetchone()
    activity = conn.execute(
        "SELECT activity, unit, sum(quantity) FROM daily_progress WHERE project_id = %s AND report_date <= %s"
        " GROUP BY activity, unit ORDER BY activity",
        (project_id, as_of),
    ).fetchall()
    poles = dict(
        conn.execute(
            "SELECT status, count(*) FROM poles WHERE project_id = %s GROUP BY status", (project_id,)
        ).fetchall()
    )
    done = tasks.get("done", 0)
    return {
        "as_of": as_of.isoformat(),
        "project": {
            k: (v.isoformat() if isinstance(v, dt.date) else float(v) if k == "budget_zar" else v)
            for k, v in project.items()
        },
        "days_to_target": (project["target_end_date"] - as_of).days,
        "tasks_by_status": tasks,
        "tasks_done_share": round(done / max(1, sum(tasks.values())), 3),
        "blocked_tasks": blocked,
        "overdue_tasks": overdue,
        "progress_last_7_days": float(week[0]),
        "progress_previous_7_days": float(week[1]),
        "progress_to_date": {f"{a} ({u})": float(q) for a, u, q in activity},
        "poles_by_status": poles,
    }


def _facts_text(facts: dict[str, Any]) -> str:
    return "Data:\n" + orjson.dumps(facts, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


def _answer(resp: Response) -> dict[str, Any]:
    obj = orjson.loads(resp.body)
    return {
        "answer": obj["choices"][0]["message"]["content"],
        "response_id": obj.get("id"),
        "arm": resp.headers.get("x-fibreflow-arm"),
        "model_version": resp.headers.get("x-fibreflow-model-version"),
        "cache": resp.headers.get("x-fibreflow-cache"),
    }


def _ours(resp: Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.startswith("x-fibreflow-")}


def add_fibreflow_routes(app: FastAPI, router: Router) -> None:
    from fibreflow.datasets.build import load_data_config
    from fibreflow.datasets.grounded_qa import rag_messages

    res = Resources(router)
    api = router.rc.fibreflow
    system = load_data_config().system_prompt

    def chat_body(messages: list[dict[str, str]], user: str | None) -> dict[str, Any]:
        body = {"model": api.model, "messages": messages, "max_tokens": router.cfg.max_new_tokens, "temperature": 0}
        return body | ({"user": user} if user else {})

    @app.post("/v1/fibreflow/ask", summary="A question about FibreFlow data, answered from retrieved records")
    async def ask(req: AskRequest, request: Request) -> Response:
        async def work(request: Request, call: Call) -> Response:
            await router.authenticate(request, "chat", call)
            hits = await asyncio.to_thread(res.retrieve, req.question, req.k or api.k, req.filters)
            messages = rag_messages(system, req.question, [h.content for h in hits], "")[:2]
            resp = await router.dispatch(request, CHAT, chat_body(messages, req.user), call)
            if resp.status_code != 200:
                return resp
            sources = [
                {
                    "record_id": h.record_id,
                    "record_type": h.record_type,
                    "project_id": h.project_id,
                    "score": round(h.score, 4),
                }
                for h in hits
            ]
            out = _answer(resp) | {"record_ids": [h.record_id for h in hits], "sources": sources}
            return JSONResponse(out, headers=_ours(resp))

        return await router.handle(request, "/fibreflow/ask", work)

    async def project_task(request: Request, project_id: str, kind: str) -> Response:
        async def work(request: Request, call: Call) -> Response:
            await router.authenticate(request, "chat", call)
            facts = await asyncio.to_thread(res.facts, project_id)
            if facts is None:
                raise ApiError(404, f"no project {project_id!r}", param="project_id")
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": INSTRUCTIONS[kind] + "\n\n" + _facts_text(facts)},
            ]
            resp = await router.dispatch(request, CHAT, chat_body(messages, None), call, pattern="project_status")
            if resp.status_code != 200:
                return resp
            return JSONResponse(
                _answer(resp) | {"project_id": project_id, "kind": kind, "facts": facts}, headers=_ours(resp)
            )

        return await router.handle(request, f"/fibreflow/projects/{kind}", work)

    @app.get("/v1/fibreflow/projects/{project_id}/summary", summary="A project summary for its manager")
    async def summary(project_id: str, request: Request) -> Response:
        return await project_task(request, project_id, "summary")

    @app.get("/v1/fibreflow/projects/{project_id}/health", summary="A project health check (green/amber/red)")
    async def health(project_id: str, request: Request) -> Response:
        return await project_task(request, project_id, "health")

    @app.post("/v1/embeddings", summary="Embeddings from the self-hosted model (OpenAI API)")
    async def embeddings(req: EmbeddingsRequest, request: Request) -> Response:
        async def work(request: Request, call: Call) -> Response:
            await router.authenticate(request, "chat", call)
            spec = (await asyncio.to_thread(res.embedder)).spec
            call.model, call.arm, call.version = req.model, "embeddings", f"{spec.name}@{spec.revision}"
            if req.model not in (spec.name, "default"):
                raise ApiError(
                    404,
                    f"embedding model {req.model!r} is not served here: {spec.name} ({spec.dim}-d); "
                    "vectors from different models must never be mixed",
                    param="model",
                )
            if req.dimensions is not None and req.dimensions != spec.dim:
                raise ApiError(400, f"{spec.name} makes {spec.dim}-d vectors, not {req.dimensions}", param="dimensions")
            texts = [req.input] if isinstance(req.input, str) else req.input
            if not texts or len(texts) > router.rc.embeddings.max_inputs or not all(texts):
                raise ApiError(400, f"input: 1 to {router.rc.embeddings.max_inputs} non-empty strings", param="input")
            vectors, hits = await embed_cached(router, res, spec, texts)
            call.cache = f"{hits}/{len(texts)}"
            data = [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": base64.b64encode(v.tobytes()).decode()
                    if req.encoding_format == "base64"
                    else v.tolist(),
                }
                for i, v in enumerate(vectors)
            ]
            tokens = sum(len(t.split()) for t in texts)
            call.usage = {"prompt_tokens": tokens}
            headers = {
                "x-fibreflow-embedding-model": spec.name,
                "x-fibreflow-embedding-dim": str(spec.dim),
                "x-fibreflow-embedding-revision": spec.revision,
            }
            body = {
                "object": "list",
                "data": data,
                "model": spec.name,
                "dimensions": spec.dim,
                "revision": spec.revision,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            return Response(
                orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), 200, headers, media_type="application/json"
            )

        return await router.handle(request, "/embeddings", work)


async def embed_cached(router: Router, res: Resources, spec: Any, texts: list[str]) -> tuple[list[np.ndarray], int]:
    """Vectors for `texts`: from the cache where present (TTL embeddings.cache_ttl_s), the rest encoded now."""
    keys = ["ff:emb:" + hashlib.sha256(f"{spec.name}\0{spec.revision}\0{t}".encode()).hexdigest() for t in texts]
    found: list[np.ndarray | None] = []
    for key in keys:
        raw = await router.cached(key, "embeddings")
        found.append(np.frombuffer(raw, dtype=np.float32) if raw is not None else None)
    missing = [i for i, v in enumerate(found) if v is None]
    if missing:
        fresh = await asyncio.to_thread(res.encode, [texts[i] for i in missing])
        for i, vec in zip(missing, fresh, strict=True):
            found[i] = vec
            await router.store(
                keys[i], vec.astype(np.float32).tobytes(), router.rc.embeddings.cache_ttl_s, "embeddings"
            )
    return [v for v in found if v is not None], len(texts) - len(missing)
