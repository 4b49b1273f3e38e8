"""What the frontend calls besides the OpenAI API: grounded questions and templated project tasks.

- `POST /v1/fibreflow/ask`: question (+ filters) -> the tool loop (datasets/agent.py): the assistant calls
  FibreFlow's tools (datasets/tools.py: SQL over the records, a pgvector record search), reads their results and
  answers, at most `fibreflow.max_steps` rounds; the response has the answer, every tool call with its arguments,
  its record ids or its error, and the record ids the answer rests on. The request's filters bound the tools: a
  project filter replaces the project a tool call names, the others narrow the record search.
- `GET /v1/fibreflow/projects/{id}/summary` and `/health`: the conversation the assistant was trained on, its
  tool call already made: the question, the `project_status` call, its result from the records -> the model's
  answer (or one more lookup first), next to the facts computed in SQL (`fibreflow.datasets.facts`); the health check's
  green/amber/red rating is the facts' rule (`facts.health`), not the model's. Cached with the project_status TTL.
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
QUESTIONS = {"summary": "Summarise project {pid} for me.", "health": "Is project {pid} on track?"}


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
    k: int | None = Field(default=None, ge=1, le=10)  # records per record search
    user: str | None = Field(default=None, max_length=256)

    def bound(self, name: str, arguments: dict[str, Any], default_k: int) -> dict[str, Any]:
        """A tool call's arguments within this request's filters."""
        f = self.filters or AskFilters()
        out = arguments | ({"project_id": f.project_id} if f.project_id else {})
        if name == "search_records":
            narrow = {"region": f.region, "record_type": f.record_type, "date_from": f.date_from, "date_to": f.date_to}
            out |= {k: v.isoformat() if isinstance(v, dt.date) else v for k, v in narrow.items() if v is not None}
            out.setdefault("k", self.k or default_k)
        return out


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

    def retriever(self) -> Any:
        from fibreflow.datasets.embed import load_embed_config
        from fibreflow.datasets.retrieval import Retriever

        if self._retriever is None:
            cfg = load_embed_config()
            self._retriever = Retriever(Encoder(self), cfg.table, cfg.ef_search)
        return self._retriever

    def run_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        """A FibreFlow tool on a pooled connection (read-only transaction, statement timeout: datasets/tools.py)."""
        from fibreflow.datasets.tools import run_tool

        with self.pool().connection(timeout=5) as conn:
            return run_tool(conn, name, arguments, retriever=self.retriever())

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


class Encoder:
    """The shared embedder behind its lock, as a retriever's text encoder."""

    def __init__(self, res: Resources) -> None:
        self.res = res

    @property
    def spec(self) -> Any:
        return self.res.embedder().spec

    def encode(self, texts: list[str]) -> Any:
        return self.res.encode(texts)

    def embed(self, texts: list[str]) -> tuple[Any, int]:
        return self.res.embed(texts)


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
    from fibreflow.datasets.agent import Loop
    from fibreflow.datasets.assistant import tool_call
    from fibreflow.datasets.config import load_data_config
    from fibreflow.datasets.facts import health
    from fibreflow.datasets.tools import schemas

    api = APIRouter(route_class=guarded(("chat",)))
    model = router.rc.fibreflow.model
    system = load_data_config().system_prompt

    def chat_body(messages: list[dict[str, str]], user: str | None) -> dict[str, Any]:
        body = {"model": model, "messages": messages, "max_tokens": router.cfg.max_new_tokens, "temperature": 0}
        return body | ({"user": user} if user else {})

    tools = schemas()

    async def answered(request: Request, call: Call, loop: Loop, run: Any, user: str | None = None,
                       pattern: str | None = None) -> Response:  # fmt: skip
        """The loop's model turns through the router until it answers: the last turn's response (or the first that
        failed)."""
        used = {"prompt_tokens": 0, "completion_tokens": 0}
        while True:
            body = chat_body(loop.messages, user) | {"tools": tools, "tool_choice": loop.tool_choice}
            call.usage = {}  # a cached turn sets none
            resp = await router.dispatch(request, CHAT, body, call, pattern=pattern)
            if resp.status_code != 200:
                return resp
            for k in used:  # the call is audited with every turn's tokens
                used[k] += int(call.usage.get(k) or 0)
            await asyncio.to_thread(loop.take, orjson.loads(resp.body)["choices"][0]["message"], run)
            if loop.done:
                call.usage = call.usage | used | {"total_tokens": sum(used.values())}
                return resp

    @api.post("/v1/fibreflow/ask", summary="A question about FibreFlow data, answered through FibreFlow's tools")
    async def ask(req: AskRequest, request: Request, call: CurrentCall) -> Response:
        fib = router.rc.fibreflow
        loop = Loop.start(system, req.question, fib.max_steps)

        def run(name: str, arguments: dict[str, Any]) -> Any:
            return res.run_tool(name, req.bound(name, arguments, fib.k))

        resp = await answered(request, call, loop, run, req.user)
        if resp.status_code != 200:
            return resp
        return JSONResponse(_answer(resp) | loop.json(), headers=_ours(resp))

    async def project_task(request: Request, call: Call, project_id: str, kind: str) -> Response:
        facts = await asyncio.to_thread(res.facts, project_id)
        if facts is None:
            raise ApiError(404, f"no project {project_id!r}", param="project_id")
        # the round the model would begin with is made here: it only answers, or looks up once more
        loop = Loop.start(system, QUESTIONS[kind].format(pid=project_id), router.rc.fibreflow.max_steps)
        status = tool_call("project_status", {"project_id": project_id})
        await asyncio.to_thread(loop.take, {"tool_calls": [status]}, res.run_tool)
        resp = await answered(request, call, loop, res.run_tool, pattern="project_status")
        if resp.status_code != 200:
            return resp
        out = _answer(resp) | loop.json() | {"project_id": project_id, "kind": kind, "facts": facts}
        return JSONResponse(out | ({"health": health(facts)} if kind == "health" else {}), headers=_ours(resp))

    @api.get("/v1/fibreflow/projects/{project_id}/summary", summary="A project summary for its manager")
    async def project_summary(project_id: str, request: Request, call: CurrentCall) -> Response:
        return await project_task(request, call, project_id, "summary")

    @api.get("/v1/fibreflow/projects/{project_id}/health", summary="A project health check (green/amber/red)")
    async def project_health(project_id: str, request: Request, call: CurrentCall) -> Response:
        return await project_task(request, call, project_id, "health")

    return api
