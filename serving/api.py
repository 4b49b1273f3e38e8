"""The router's own routes besides the frontend, embeddings, feedback and admin ones: the OpenAI endpoints as the
schema declares them, `/v1/models`, `/health` and `/metrics` (or a separate metrics listener)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fibreflow.serving.audit import Call
from fibreflow.serving.guard import guarded
from fibreflow.serving.protocol import ApiError, ChatRequest, CompletionRequest, error_response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from fibreflow.serving.router import Router


def openai_routes(router: Router) -> APIRouter:
    from fibreflow.serving.router import CHAT, COMPLETIONS

    api = APIRouter()

    # Served by the router's FastPath (which sees these two first); declared here for the OpenAPI schema.
    @api.post("/v1/chat/completions", summary="Chat completion (OpenAI API), routed to an arm", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await router.openai(request, CHAT)

    @api.post("/v1/completions", summary="Text completion (OpenAI API), routed to an arm", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await router.openai(request, COMPLETIONS)

    models = APIRouter(route_class=guarded(("chat",)))

    @models.get("/v1/models", summary="The models clients can ask for, with each arm's current model")
    async def list_models() -> dict[str, Any]:
        versions = router.targets.versions()
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "fibreflow", "arms": versions.get(m, {})}
            for m in router.targets.experiments
        ]
        return {"object": "list", "data": data}

    api.include_router(models)
    return api


def ops_routes(router: Router) -> APIRouter:
    """/health and /metrics: not audited (probes and scrapes every few seconds), not rate-limited."""
    ops = APIRouter()

    @ops.get("/health", summary="Up or down; with a valid key also each arm's model and the cache backend")
    async def health(request: Request) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok"}
        if await _valid(router, request, ()):
            out |= {"arms": router.targets.versions(), "cache": router.cache.kind}
        return out

    @ops.get("/metrics", summary="Prometheus metrics (a key with the metrics or admin scope)")
    async def metrics(request: Request) -> Response:
        try:
            await _check(router, request, ("metrics", "admin"))
        except ApiError as exc:
            return error_response(exc)
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return ops


async def _check(router: Router, request: Request, scopes: tuple[str, ...]) -> None:
    if router.keys is not None:
        call = Call(0.0, request.url.path, "")
        await router.keys.authenticate(request.headers.get("authorization", ""), scopes, call)


async def _valid(router: Router, request: Request, scopes: tuple[str, ...]) -> bool:
    if router.keys is not None and "authorization" not in request.headers:
        return False
    try:
        await _check(router, request, scopes)
    except ApiError:
        return False
    return True


def metrics_listener(router: Router) -> Any:
    """With `router.metrics_listen` ("host:port"): /metrics there, without a key, for a scraper on a private
    network; the server to shut down on exit (None without one)."""
    listen = router.rc.metrics_listen
    if not listen:
        return None
    from prometheus_client import start_http_server

    host, _, port = listen.rpartition(":")
    server, _ = start_http_server(int(port), host or "127.0.0.1", registry=router.metrics.registry)
    return server
