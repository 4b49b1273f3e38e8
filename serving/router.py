"""`fibreflow serve`: the OpenAI-compatible router in front of the upstreams (local model server, vLLM).

`create_app(cfg)` builds the FastAPI app. A chat or completion request is read once as bytes (size-checked,
parsed with orjson), assigned an arm (sticky by user, or forced by header), looked up in the response cache, and
forwarded over a pooled connection to the arm's upstream with its model renamed to what the upstream serves; the
answer comes back byte for byte (streams chunk by chunk), with the arm and model version in the headers.
A shadow arm gets a copy off the request path; its answer is scored against the returned one and logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import orjson
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fibreflow.core.config import resolve_path
from fibreflow.core.errors import FibreFlowError
from fibreflow.serving.ab import Target, Targets, choose
from fibreflow.serving.admin import add_admin_routes
from fibreflow.serving.audit import AuditWriter, Call
from fibreflow.serving.cache import ResponseCache, last_user_text
from fibreflow.serving.config import Experiment, ServingConfig, served_name
from fibreflow.serving.fibreflow_api import add_fibreflow_routes
from fibreflow.serving.keys import KeyCache
from fibreflow.serving.limits import Limiter
from fibreflow.serving.metrics import Metrics
from fibreflow.serving.protocol import ApiError, Feedback, error_response, install_error_handlers
from fibreflow.serving.resilience import Guard, period
from fibreflow.serving.shadow import shadow
from fibreflow.serving.upstream import Answer, UpstreamFailed, Upstreams, ensure_adapter, usage_of
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("fibreflow.serving")
CHAT, COMPLETIONS = "/chat/completions", "/completions"
RECENT_KEEP = 100_000  # response ids remembered for feedback
AliasHook = Callable[[str, str], str | None]  # (alias, new version) -> the URL now serving it, or None
# streamed chunks carrying text (OpenAI servers send compact JSON, about one token per chunk)
_TOKEN_MARKS, _EMPTY_MARKS = (b'"content":"', b'"text":"'), (b'"content":""', b'"text":""')


class Router:
    """The router's state: config, targets, cache, keys, limits, audit, upstream pool, metrics."""

    def __init__(
        self, cfg: ServingConfig, redis_url: str | None, database_url: str | None, alias_hook: AliasHook | None = None
    ) -> None:
        self.cfg, self.rc, self.alias_hook = cfg, cfg.router, alias_hook
        self.targets = Targets(cfg.registered_model, self.rc.experiments)
        self.cache = ResponseCache(self.rc.cache, redis_url)
        self.guard = Guard(self.rc.resilience)
        fb = self.rc.fallback
        self.fallback = Target(fb.upstream, fb.model, None) if fb is not None else None
        self.limiter = Limiter(redis_url, self.rc.limits.redis_timeout_s, self.rc.limits.shared_staleness_s)
        self.database_url = database_url
        self.keys = KeyCache(database_url, self.rc.auth.cache_s) if self.rc.auth.required and database_url else None
        a = self.rc.audit
        self.audit = AuditWriter(database_url, a.batch_size, a.flush_s) if a.enabled and database_url else None
        self.upstreams = Upstreams(self.rc.upstreams)
        self.metrics = Metrics()
        self.metrics.cache_up.labels(self.cache.kind).set(1)
        self.metrics.limiter_errors.set_function(lambda: self.limiter.sync_errors)
        self.recent: OrderedDict[str, tuple[str, str]] = OrderedDict()  # response id -> (arm, model version)
        self.shadow_log = resolve_path("var/serving/shadow.jsonl")
        self._tasks: set[asyncio.Task[None]] = set()
        self.watcher: Any = None

    # ---- registry aliases ----------------------------------------------------------------------------------

    def on_alias(self, alias: str, old: str | None, new: str | None) -> None:
        """The alias moved: have every upstream serving an arm on it serve the new version, then repoint. An
        `alias_hook` (merged arms: a new vLLM per version) answers with the URL that serves it; otherwise the
        version's adapter is loaded on the arm's upstream."""
        if new is not None:
            try:
                url = self.alias_hook(alias, new) if self.alias_hook is not None else None
            except Exception as exc:
                log.warning("alias %s -> v%s: the new version could not be started: %s", alias, new, exc)
                return  # the arm keeps serving the version it has
            for _, arm in self.targets.alias_arms(alias):
                if url is not None:
                    self.rc.upstreams[arm.upstream] = self.rc.upstreams[arm.upstream].model_copy(update={"url": url})
                    continue
                try:
                    served = served_name(self.cfg.registered_model, new)
                    ensure_adapter(self.rc.upstreams[arm.upstream], served, self.cfg.registered_model, new)
                except Exception as exc:  # the upstream may be down; requests will say so, the move still stands
                    log.warning("alias %s -> v%s: could not load it on %s: %s", alias, new, arm.upstream, exc)
        self.targets.move(alias, new)
        self.metrics.alias_moves.labels(alias).inc()
        log.info("alias %s: v%s -> v%s", alias, old, new)

    def start_watching(self) -> None:
        aliases = tuple(sorted({a.alias for e in self.rc.experiments for a in e.arms if a.alias}))
        if not aliases:
            return
        from fibreflow.core.tracking import setup_mlflow
        from fibreflow.registry.watch import AliasWatcher

        setup_mlflow("fibreflow-serving")
        self.watcher = AliasWatcher(self.cfg.registered_model, aliases, self.on_alias, self.rc.alias_poll_s)
        for alias, version in self.watcher.versions.items():
            if version is not None:
                self.on_alias(alias, None, version)
        self.watcher.start()

    # ---- requests ------------------------------------------------------------------------------------------

    def parse(self, raw: bytes, path: str) -> dict[str, Any]:
        if len(raw) > self.rc.max_body_bytes:
            raise ApiError(413, f"request body is {len(raw)} bytes, over the limit of {self.rc.max_body_bytes}")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise ApiError(400, "model: field required (a string)", param="model")
        if path == CHAT and not (isinstance(body.get("messages"), list) and body["messages"]):
            raise ApiError(400, "messages: field required (a non-empty list)", param="messages")
        if path == COMPLETIONS and not isinstance(body.get("prompt"), str | list):
            raise ApiError(400, "prompt: field required", param="prompt")
        return body

    def assign(self, body: dict[str, Any], request: Request, caller: str) -> tuple[Experiment, str, Target, str | None]:
        """(experiment, arm, target, fallback reason): the forced arm, else the schedule's route, else the sticky
        split; the fallback instead when the schedule says so, the router is overloaded or the arm's breaker is open."""
        model = body["model"]
        exp = self.targets.experiments.get(model)
        if exp is None:
            known = ", ".join(self.targets.experiments)
            raise ApiError(
                404, f"The model `{model}` does not exist (served: {known})", param="model", code="model_not_found"
            )
        available = self.targets.available(model)
        forced = request.headers.get(self.rc.arm_header)
        if forced is not None:
            if forced not in available:
                raise ApiError(
                    400,
                    f"{self.rc.arm_header}: arm {forced!r} of {model} is unknown or has no target "
                    f"(available: {', '.join(sorted(available))})",
                )
            target = self.targets.get(model, forced)
            assert target is not None
            return exp, forced, target, None
        now = period(self.rc.schedule) if self.rc.schedule.periods else None
        route = now.route if now is not None else "experiment"
        if route == "fallback" and self.fallback is not None:
            return exp, "fallback", self.fallback, f"schedule_{now.name if now else ''}"
        if route in available:
            name = route
        else:
            arm = choose(exp, body["user"] if isinstance(body.get("user"), str) else caller, available)
            if arm is None:
                if self.fallback is not None:
                    return exp, "fallback", self.fallback, "no_arm"
                raise ApiError(503, f"no arm of {model} has a model to serve (registry aliases unset?)")
            name = arm.name
        target = self.targets.get(model, name)
        assert target is not None
        if self.fallback is not None:
            breaker = self.guard.breaker(target.upstream, target.model)
            why = self.guard.overloaded() or (None if breaker.allow() else "breaker_open")
            if why is not None:
                return exp, "fallback", self.fallback, why
        return exp, name, target, None

    async def _attempts(self, arm: str, target: Target, fn: Any) -> Any:
        """`fn()` retried on a timeout, refused connection or 5xx; feeds the target's breaker and the load."""
        breaker = self.guard.breaker(target.upstream, target.model)
        self.guard.in_flight += 1
        started = time.perf_counter()
        try:
            for attempt in range(self.rc.resilience.retries + 1):
                try:
                    out = await fn()
                except UpstreamFailed:
                    if attempt == self.rc.resilience.retries:
                        breaker.record(False)
                        raise
                    self.metrics.retries.labels(arm, target.upstream).inc()
                else:
                    breaker.record(True)
                    self.guard.observe(time.perf_counter() - started)
                    return out
        finally:
            self.guard.in_flight -= 1

    async def forward(self, call: Call, body: dict[str, Any], path: str, target: Target, stream: bool) -> Any:
        """The upstream's answer (an `Answer`, or the open streamed response); after the retries, the fallback's.
        Updates `call` (arm, version, fallback reason) when the fallback answered."""

        def attempt(t: Target) -> Any:
            payload = orjson.dumps({**body, "model": t.model})
            if stream:
                return lambda: self.upstreams.open_stream(t.upstream, path, payload)
            return lambda: self.upstreams.post(t.upstream, path, payload)

        try:
            return await self._attempts(call.arm or "", target, attempt(target))
        except UpstreamFailed as exc:
            if self.fallback is None or call.arm == "fallback":
                call.kind = exc.kind.split(":")[0]
                raise ApiError(exc.status, f"upstream {target.upstream} for arm {call.arm}: {exc.kind}") from None
        self.metrics.fallbacks.labels("upstream_error").inc()
        call.arm, call.version, call.fallback = "fallback", self.fallback.model, "upstream_error"
        try:
            return await self._attempts("fallback", self.fallback, attempt(self.fallback))
        except UpstreamFailed as exc:
            call.kind = exc.kind.split(":")[0]
            raise ApiError(exc.status, f"upstream {target.upstream} and the fallback failed: {exc.kind}") from None

    async def cached(self, key: str, arm: str) -> bytes | None:
        try:
            hit = await self.cache.get(key)
        except Exception as exc:  # Redis down or slow: serve without cache, visibly
            self._cache_failed(arm, exc)
            return None
        self.metrics.cache.labels(arm, "hit" if hit is not None else "miss").inc()
        return hit

    async def store(self, key: str, value: bytes, ttl: int, arm: str) -> None:
        try:
            await self.cache.set(key, value, ttl)
        except Exception as exc:
            self._cache_failed(arm, exc)
        else:
            self.metrics.cache_up.labels(self.cache.kind).set(1)

    def _cache_failed(self, arm: str, exc: Exception) -> None:
        self.metrics.cache.labels(arm, "error").inc()
        self.metrics.cache_up.labels(self.cache.kind).set(0)
        log.warning("cache %s failed (%s): serving without it", self.cache.kind, type(exc).__name__)

    def remember(self, response_id: str | None, arm: str, version: str) -> None:
        if response_id:
            self.recent[response_id] = (arm, version)
            if len(self.recent) > RECENT_KEEP:
                self.recent.popitem(last=False)

    def finish(self, call: Call) -> None:
        """Every request ends here once: metrics, the key's token spend, the audit row."""
        m, elapsed = self.metrics, time.perf_counter() - call.started
        arm = call.arm or "none"
        m.requests.labels(arm, call.version or "none", str(call.status)).inc()
        m.latency.labels(arm).observe(elapsed)
        if call.status >= 400:
            m.errors.labels(arm, call.kind or ("client_error" if call.status < 500 else "upstream_error")).inc()
        done = int(call.usage.get("completion_tokens") or 0)
        if done:
            m.tokens.labels(arm).inc(done)
            m.prompt_tokens.labels(arm).inc(int(call.usage.get("prompt_tokens") or 0))
            m.tokens_per_s.labels(arm).observe(done / max(elapsed, 1e-6))
            self.limiter.spend(call.limit_id, done + int(call.usage.get("prompt_tokens") or 0))
        if self.audit is not None:
            self.audit.add(call.row(elapsed))

    async def authenticate(self, request: Request, scope: str, call: Call) -> None:
        """The caller's key (when keys are required): valid, unexpired, unrevoked, with `scope`; then its limits."""
        if self.keys is not None:
            call.key = await self.keys.authenticate(request.headers.get("authorization", ""), scope, call)
        rpm = (call.key and call.key.requests_per_minute) or self.rc.limits.requests_per_minute
        tpm = (call.key and call.key.tokens_per_minute) or self.rc.limits.tokens_per_minute
        try:
            wait = await self.limiter.admit(call.limit_id, rpm, tpm)
        except Exception:  # the limiter's Redis is down: let the request through, visibly
            self.metrics.errors.labels("none", "limiter").inc()
            return
        if wait is not None:
            retry = str(math.ceil(wait))
            raise ApiError(
                429,
                f"rate limit reached ({rpm} requests or {tpm} tokens per minute); retry in {retry} s",
                headers={"Retry-After": retry},
            )

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def handle(self, request: Request, path: str, work: Any = None) -> Response:
        """Run `work(request, call)` (default: a proxied OpenAI call to `path`) with the audit row and metrics
        every request gets, whether it is answered or refused."""
        call = Call(time.perf_counter(), path, request.client.host if request.client else "unknown")
        try:
            try:
                response = await (work(request, call) if work else self._handle(request, path, call))
            except FibreFlowError as exc:  # the database or an index is not as it must be: say what to do
                raise ApiError(503, str(exc)) from None
        except ApiError as exc:
            call.status, call.error = exc.status, exc.message
            self.finish(call)
            raise
        if not call.streaming:
            self.finish(call)
        return response

    async def _handle(self, request: Request, path: str, call: Call) -> Response:
        await self.authenticate(request, "chat", call)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.rc.max_body_bytes:  # refused before reading it
            raise ApiError(413, f"request body is {declared} bytes, over the limit of {self.rc.max_body_bytes}")
        return await self.dispatch(request, path, self.parse(await request.body(), path), call)

    async def dispatch(
        self, request: Request, path: str, body: dict[str, Any], call: Call, pattern: str | None = None
    ) -> Response:
        """A parsed request through arm assignment, cache and upstream (`pattern` forces a cache TTL pattern)."""
        call.model = body["model"]
        if self.rc.audit.log_prompts:
            call.prompt = last_user_text(body)
        exp, call.arm, target, call.fallback = self.assign(body, request, call.key_id or call.caller)
        if call.fallback is not None:
            self.metrics.fallbacks.labels(call.fallback).inc()
        call.version = target.version or target.model
        _, ttl = self.cache.policy(body, pattern)
        key = self.cache.key(body, target.model) if ttl else None
        call.cache = "miss" if key else "bypass"
        if key is not None and (hit := await self.cached(key, call.arm)) is not None:
            call.cache = "hit"
            return Response(hit, 200, call.headers(), media_type="application/json")
        if body.get("stream"):
            return await self.stream(exp, target, path, body, call)
        answer: Answer = await self.forward(call, body, path, target, stream=False)
        call.status = answer.status
        call.usage = usage_of(answer.body) if answer.status == 200 else {}
        self.remember(call.usage.get("id"), call.arm, call.version)
        if key is not None and answer.status == 200 and call.fallback != "upstream_error":
            self.spawn(self.store(key, answer.body, ttl, call.arm))  # off the request path
        if exp.shadow and exp.shadow != call.arm:
            self.spawn(shadow(self, exp, body, path, answer.body))
        return Response(answer.body, answer.status, call.headers(), media_type=answer.content_type)

    async def stream(self, exp: Experiment, target: Target, path: str, body: dict[str, Any], call: Call) -> Response:
        resp = await self.forward(call, body, path, target, stream=True)
        if resp.status != 200:  # the upstream's own 4xx, passed on as it is
            data = await resp.read()
            resp.release()
            call.status = resp.status
            return Response(data, resp.status, call.headers(), media_type="application/json")
        if exp.shadow and exp.shadow != call.arm:
            self.spawn(shadow(self, exp, body, path, None))
        call.streaming = True
        arm = call.arm or ""

        async def relay() -> AsyncIterator[bytes]:
            first, chunks, rid = None, 0, None
            try:
                async for data in resp.content.iter_any():
                    tokens = sum(data.count(m) for m in _TOKEN_MARKS) - sum(data.count(m) for m in _EMPTY_MARKS)
                    if first is None and tokens > 0:
                        first = time.perf_counter()
                        self.metrics.ttft.labels(arm).observe(first - call.started)
                    chunks += tokens
                    if rid is None and (i := data.find(b'"id":"')) >= 0:
                        rid = data[i + 6 : data.find(b'"', i + 6)].decode()
                    yield data
            finally:
                resp.release()
                call.usage = {"completion_tokens": chunks}
                self.remember(rid, arm, call.version or "")
                self.finish(call)

        return StreamingResponse(relay(), 200, call.headers(), media_type="text/event-stream")

    def feedback(self, fb: Feedback) -> dict[str, Any]:
        found = self.recent.get(fb.response_id)
        if found is None:
            raise ApiError(404, f"no recent response with id {fb.response_id!r}", param="response_id")
        arm, version = found
        self.metrics.feedback.labels(arm, version).inc()
        self.metrics.feedback_score.labels(arm, version).observe(fb.value)
        return {"status": "recorded", "arm": arm, "model_version": version}

    def models(self) -> dict[str, Any]:
        versions = self.targets.versions()
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "fibreflow", "arms": versions.get(m, {})}
            for m in self.targets.experiments
        ]
        return {"object": "list", "data": data}


class FastPath:
    """POST /v1/chat/completions and /v1/completions go straight to `Router.handle`, past FastAPI's routing and
    endpoint layers (they cost ~0.3 ms a request here, a third of the router's budget); FastAPI still declares
    both routes for the OpenAPI schema, and serves everything else."""

    PATHS: ClassVar[dict[str, str]] = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS}

    def __init__(self, app: Any, router: Router) -> None:
        self.app, self.router = app, router

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = self.PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if path is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            response = await self.router.handle(Request(scope, receive), path)
        except ApiError as exc:
            response = error_response(exc)
        await response(scope, receive, send)


def _database(cfg: ServingConfig, url: str | None) -> str | None:
    """The database of keys, audit rows and the frontend's data: `url`, else DATABASE_URL or the embedded one
    when keys or audit need it at start (checked to be migrated), else found on first use."""
    if url is None and not (cfg.router.auth.required or cfg.router.audit.enabled):
        return None
    from fibreflow.core.db import check_schema, connect, database_url, load_db_config

    url = url or database_url(load_db_config())
    if cfg.router.auth.required or cfg.router.audit.enabled:
        with connect(url) as conn:
            check_schema(conn)
    return url


def create_app(
    cfg: ServingConfig,
    *,
    redis_url: str | None = None,
    database_url: str | None = None,
    watch: bool = True,
    alias_hook: AliasHook | None = None,
) -> FastAPI:
    """The router app. `redis_url` (default: $REDIS_URL; "" = none) backs the cache and the limits; the database
    (default: DATABASE_URL or the embedded one) holds keys and audit rows; `watch` follows registry aliases."""
    redis_url = redis_url if redis_url is not None else os.environ.get("REDIS_URL")
    router = Router(cfg, redis_url, _database(cfg, database_url), alias_hook)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await router.upstreams.start()
        if router.audit is not None:
            router.audit.start()
        if watch:
            await asyncio.to_thread(router.start_watching)
        yield
        if router.watcher is not None:
            router.watcher.stop()
        if router._tasks:
            await asyncio.wait(router._tasks, timeout=10)
        if router.audit is not None:
            await router.audit.close()  # a clean shutdown loses no audit row
        if router.keys is not None:
            await router.keys.close()
        await router.upstreams.close()
        await router.cache.close()
        await router.limiter.close()

    app = FastAPI(
        title="FibreFlow router",
        version="1",
        lifespan=lifespan,
        description="OpenAI-compatible A/B router in front of the FibreFlow assistant's upstreams.",
    )
    app.state.router = router
    install_error_handlers(app)
    app.add_middleware(FastPath, router=router)  # added first: CORS (if any) wraps it
    if cfg.router.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.router.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-fibreflow-arm", "x-fibreflow-model-version"],
        )

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI API), routed to an arm")
    async def chat(request: Request) -> Response:
        return await router.handle(request, CHAT)

    @app.post("/v1/completions", summary="Text completion (OpenAI API), routed to an arm")
    async def completions(request: Request) -> Response:
        return await router.handle(request, COMPLETIONS)

    @app.get("/v1/models", summary="The models clients can ask for, with each arm's current model")
    async def models(request: Request) -> Response:
        async def work(request: Request, call: Call) -> Response:
            await router.authenticate(request, "chat", call)
            return JSONResponse(router.models())

        return await router.handle(request, "/models", work)

    @app.post("/v1/feedback", summary="A score (0..1) or thumbs up/down for a response id")
    async def feedback(fb: Feedback) -> dict[str, Any]:
        return router.feedback(fb)

    add_fibreflow_routes(app, router)

    add_admin_routes(app, router)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "arms": router.targets.versions(), "cache": router.cache.kind}

    return app
