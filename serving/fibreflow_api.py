"""What the frontend calls besides the OpenAI API: grounded questions and templated project tasks.

- `POST /v1/fibreflow/ask`: question (+ filters) -> top-k records from pgvector -> the assistant's answer with
  the record ids it was grounded on.
- `GET /v1/fibreflow/projects/{id}/summary` and `/health`: the project's facts computed in SQL
  (`fibreflow.datasets.facts`) -> a prompt whose long instruction prefix is the same for every project (vLLM's
  prefix cache reuses it) -> the answer, next to the facts; cached with the project_status TTL.
Both go through the router's keys, limits, A/B, cache, metrics and audit like any chat call. The database is
reached through a small pool whose connections are checked before use: after a Postgres restart the next request
reconnects.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fibreflow.serving.audit import Call
from fibreflow.serving.guard import CurrentCall, guarded
from fibreflow.serving.protocol import ApiError
from pydantic import BaseModel, ConfigDict, Field

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
    model_config = ConfigDict(extra="forbid")
    project_id: str | None = Field(default=None, max_length=100)
    region: str | None = Field(default=None, max_length=100)
    record_type: str | None = Field(default=None, max_length=100)
    date_from: dt.date | None = None
    date_to: dt.date | None = None


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=4000)
    filters: AskFilters | None = None
    k: int | None = Field(default=None, ge=1, le=20)
    user: str | None = Field(default=None, max_length=256)


class Resources:
    """The embedder and a connection pool, made on first use and shared by the endpoints (used from worker
    threads: the embedder one call at a time)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._lock = threading.Lock()
        self._embedder: Any = None
        self._pool: Any = None
        self._retriever: Any = None

    def embedder(self) -> Any:
        """The in-process model (`embeddings.model`), or the one on `embeddings.upstream`."""
        with self._lock:
            if self._embedder is None:
                e = self.router.rc.embeddings
                if e.upstream is not None:
                    from fibreflow.serving.embeddings import RemoteEmbedder

                    self._embedder = RemoteEmbedder(self.router.rc.upstreams[e.upstream], e.model, e.revision)
                else:
                    from fibreflow.datasets.embedding import Embedder

                    self._embedder = Embedder(e.model)
            return self._embedder

    def pool(self) -> Any:
        if self._pool is None:
            from fibreflow.core.db import connection_pool, database_url, load_db_config

            self._pool = connection_pool(self.router.database_url or database_url(load_db_config()), max_size=4)
        return self._pool

    def retrieve(self, question: str, k: int, filters: AskFilters | None) -> list[Any]:
        from fibreflow.datasets.embed import load_embed_config
        from fibreflow.datasets.retrieval import Filters, Retriever

        if self._retriever is None:
            cfg = load_embed_config()
            self._retriever = Retriever(self.embedder(), cfg.table, cfg.ef_search)
        vector = self.encode([question])[0]
        with self.pool().connection(timeout=5) as conn:
            return self._retriever.search_vector(conn, vector, k, Filters(**(filters.model_dump() if filters else {})))

    def facts(self, project_id: str) -> dict[str, Any] | None:
        from fibreflow.datasets.facts import project_facts

        with self.pool().connection(timeout=5) as conn, conn.transaction():
            return project_facts(conn, project_id)

    def encode(self, texts: list[str]) -> Any:
        """Vectors only (retrieval's query): no token count."""
        embedder = self.embedder()
        with self._lock:
            return embedder.encode(texts)

    def embed(self, texts: list[str]) -> tuple[Any, int]:
        """Vectors and the tokens the model read for them."""
        embedder = self.embedder()
        with self._lock:
            return embedder.embed(texts)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


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


def frontend_routes(router: Router, res: Resources) -> APIRouter:
    from fibreflow.datasets.config import load_data_config
    from fibreflow.datasets.grounded_qa import rag_messages

    api = APIRouter(route_class=guarded(("chat",)))
    model = router.rc.fibreflow.model
    system = load_data_config().system_prompt

    def chat_body(messages: list[dict[str, str]], user: str | None) -> dict[str, Any]:
        body = {"model": model, "messages": messages, "max_tokens": router.cfg.max_new_tokens, "temperature": 0}
        return body | ({"user": user} if user else {})

    @api.post("/v1/fibreflow/ask", summary="A question about FibreFlow data, answered from retrieved records")
    async def ask(req: AskRequest, request: Request, call: CurrentCall) -> Response:
        hits = await asyncio.to_thread(res.retrieve, req.question, req.k or router.rc.fibreflow.k, req.filters)
        messages = rag_messages(system, req.question, [h.content for h in hits], "")[:2]
        resp = await router.dispatch(request, CHAT, chat_body(messages, req.user), call)
        if resp.status_code != 200:
            return resp
        sources = [
            {"record_id": h.record_id, "record_type": h.record_type, "project_id": h.project_id,
             "score": round(h.score, 4)}
            for h in hits
        ]  # fmt: skip
        out = _answer(resp) | {"record_ids": [h.record_id for h in hits], "sources": sources}
        return JSONResponse(out, headers=_ours(resp))

    async def project_task(request: Request, call: Call, project_id: str, kind: str) -> Response:
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

    @api.get("/v1/fibreflow/projects/{project_id}/summary", summary="A project summary for its manager")
    async def summary(project_id: str, request: Request, call: CurrentCall) -> Response:
        return await project_task(request, call, project_id, "summary")

    @api.get("/v1/fibreflow/projects/{project_id}/health", summary="A project health check (green/amber/red)")
    async def health(project_id: str, request: Request, call: CurrentCall) -> Response:
        return await project_task(request, call, project_id, "health")

    return api
