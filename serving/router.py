"""`fibreflow serve`: the OpenAI-compatible router in front of the upstreams (local model server, vLLM).

`create_app(cfg)` builds the FastAPI app. A chat or completion request is checked (key, scope, limits), read
within the size limit, validated field by field, routed to an arm (`routing.py`: forced by a QA key, the
schedule, the sticky split, breakers, overload), looked up in the response cache, and forwarded over a pooled
connection to the arm's upstream with its model renamed to what the upstream serves; the answer comes back byte
for byte (streams event by event, `relay.py`), with the arm and model version in the headers. Every request ends
in `finish` exactly once: metrics, the key's token spend, one audit row.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import orjson
import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fibreflow.core.config import resolve_path
from fibreflow.core.errors import FibreFlowError
from fibreflow.serving.ab import Targets
from fibreflow.serving.audit import AuditWriter, Call
from fibreflow.serving.cache import ResponseCache, last_user_text
from fibreflow.serving.config import ServingConfig, served_name
from fibreflow.serving.guard import read_body
from fibreflow.serving.keys import KeyCache
from fibreflow.serving.limits import limiter
from fibreflow.serving.metrics import Metrics
from fibreflow.serving.protocol import (
    ApiError,
    ClientGone,
    error_response,
    install_error_handlers,
    invalid_request,
    unless_client_goes,
    validate_request,
)
from fibreflow.serving.relay import Relay, RelayResponse, with_usage
from fibreflow.serving.resilience import Guard, period
from fibreflow.serving.routing import Route, Situation, Target, route
from fibreflow.serving.shadow import shadow
from fibreflow.serving.upstream import Answer, Upstreams, UpstreamUnavailable, ensure_adapter, usage_of
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("fibreflow.serving")
CHAT, COMPLETIONS = "/chat/completions", "/completions"
RECENT_KEEP = 100_000  # response id -> (arm, version, key) remembered for feedback
AliasHook = Callable[[str, str], str | None]  # (alias, new version) -> the URL now serving it, or None


class Router:
    """The router's state: config, targets, cache, keys, limits, audit, upstream pool, metrics."""

    def __init__(
        self, cfg: ServingConfig, redis_url: str | None, database_url: str | None, alias_hook: AliasHook | None = None
    ) -> None:
        self.cfg, self.rc, self.alias_hook = cfg, cfg.router, alias_hook
        self.targets = Targets(cfg.registered_model, self.rc.experiments)
        self.metrics = Metrics()
        self.cache = ResponseCache(self.rc.cache, redis_url, self.metrics)
        self.guard = Guard(self.rc.resilience)
        fb = self.rc.fallback
        self.fallback = Target(fb.upstream, fb.model, None) if fb is not None else None
        lim = self.rc.limits
        self.limiter = limiter(redis_url, lim.redis_timeout_s, lim.shared_staleness_s)
        self.database_url = database_url
        self.pool: Any = None
        if database_url:
            from psycopg_pool import AsyncConnectionPool

            kwargs = {"autocommit": True, "connect_timeout": 3}
            self.pool = AsyncConnectionPool(database_url, min_size=1, max_size=8, open=False, kwargs=kwargs,
                                            check=AsyncConnectionPool.check_connection)  # fmt: skip
        self.keys = KeyCache(self.pool, self.rc.auth) if self.rc.auth.required and self.pool is not None else None
        a = self.rc.audit
        self.audit = (
            AuditWriter(database_url, a.batch_size, a.flush_s, self.metrics) if a.enabled and database_url else None
        )
        self.upstreams = Upstreams(self.rc.upstreams)
        self.metrics.limiter_errors.set_function(lambda: getattr(self.limiter.counts, "errors", 0))
        if self.keys is not None:
            self.metrics.keys_stale.set_function(lambda: self.keys.stale_served if self.keys else 0)
        self.recent: OrderedDict[str, tuple[str, str, str | None]] = OrderedDict()
        self.shadow_slots = asyncio.Semaphore(self.rc.shadow_concurrency)
        self.shadow_log = resolve_path("var/serving/shadow.jsonl")
        self._tasks: set[asyncio.Task[Any]] = set()
        self.watcher: Any = None

    # ---- registry aliases ----------------------------------------------------------------------------------

    def on_alias(self, alias: str, old: str | None, new: str | None) -> None:
        """The alias moved: have every upstream serving an arm on it serve the new version, then repoint. An
        `alias_hook` (merged arms: a new vLLM per version) answers with the URL that serves it; otherwise the
        version's adapter is loaded on the arm's upstream. A hook that fails raises: nothing moves, and the watcher
        offers the move again at its next poll."""
        if new is not None:
            try:
                url = self.alias_hook(alias, new) if self.alias_hook is not None else None
            except Exception as exc:  # the arm keeps serving the version it has; the watcher offers the move again
                raise RuntimeError(f"alias {alias} -> v{new}: the new version could not be started: {exc}") from exc
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
        self.watcher = AliasWatcher(self.cfg.registered_model, aliases, self.on_alias, self.rc.alias_poll_s,
                                    on_error=lambda _: self.metrics.alias_read_errors.inc())  # fmt: skip
        self.watcher.poll()  # what is set now, before the first request
        self.watcher.start()

    # ---- every request -------------------------------------------------------------------------------------

    def new_call(self, request: Request, endpoint: str) -> Call:
        return Call(time.perf_counter(), endpoint, request.client.host if request.client else "unknown")

    async def authenticate(self, call: Call, request: Request, scopes: tuple[str, ...]) -> None:
        """The caller's key (when keys are required) holds one of `scopes`; then its limits."""
        if self.keys is not None:
            call.key = await self.keys.authenticate(request.headers.get("authorization", ""), scopes, call)
        rpm = (call.key and call.key.requests_per_minute) or self.rc.limits.requests_per_minute
        tpm = (call.key and call.key.tokens_per_minute) or self.rc.limits.tokens_per_minute
        wait = await self.limiter.admit(call.limit_id, rpm, tpm)
        if wait is not None:
            retry = str(math.ceil(wait))
            raise ApiError(429, f"rate limit reached ({rpm} requests or {tpm} tokens per minute); retry in {retry} s",
                           headers={"Retry-After": retry})  # fmt: skip

    async def run(self, call: Call, work: Callable[[], Awaitable[Response]]) -> Response:
        """`work()`'s response, or the error it raised in OpenAI's shape; the call is finished either way (a
        stream finishes it when it ends)."""
        try:
            try:
                response = await work()
            except FibreFlowError as exc:  # the database or an index is not as it must be: say what to do
                raise ApiError(503, str(exc)) from None
            except (psycopg.Error, PoolTimeout) as exc:  # the database is down or restarting
                raise ApiError(503, f"the database is unavailable ({type(exc).__name__}); retry shortly",
                               headers={"Retry-After": "2"}) from None  # fmt: skip
            except RequestValidationError as exc:
                raise invalid_request(exc) from None
            except StarletteHTTPException as exc:  # FastAPI's own refusals (a body it cannot parse)
                raise ApiError(exc.status_code, str(exc.detail)) from None
        except ApiError as exc:
            call.status, call.error, call.kind = exc.status, exc.message, call.kind or exc.code
            response = error_response(exc)
        except ClientGone:
            call.status, call.error = 499, "the client disconnected"
            response = Response(status_code=499)
        except asyncio.CancelledError:
            call.status, call.error = 499, "cancelled"
            self.finish(call)
            raise
        except Exception as exc:  # a bug: still one audit row and an answer in OpenAI's shape; the traceback logged
            log.exception("unexpected error on %s", call.endpoint)
            call.status, call.error = 500, f"internal error: {type(exc).__name__}"
            response = error_response(ApiError(500, "internal error (logged on the router)"))
        if not call.streaming:
            self.finish(call)
        return response

    def finish(self, call: Call) -> None:
        """Every request ends here exactly once: metrics, the key's token spend, the audit row."""
        if call.finished:
            return
        call.finished = True
        m, elapsed = self.metrics, time.perf_counter() - call.started
        arm = call.arm or "none"
        m.requests.labels(arm, call.version or "none", str(call.status)).inc()
        m.latency.labels(arm).observe(elapsed)
        if call.status >= 400:
            m.errors.labels(arm, call.kind or ("client_error" if call.status < 500 else "upstream_error")).inc()
        prompt, done = int(call.usage.get("prompt_tokens") or 0), int(call.usage.get("completion_tokens") or 0)
        if done:
            m.tokens.labels(arm).inc(done)
            m.tokens_per_s.labels(arm).observe(done / max(elapsed, 1e-6))
        if prompt:
            m.prompt_tokens.labels(arm).inc(prompt)
        self.limiter.spend(call.limit_id, prompt + done)
        if self.audit is not None:
            self.audit.add(call.row(elapsed))

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- OpenAI calls --------------------------------------------------------------------------------------

    async def openai(self, request: Request, path: str) -> Response:
        """POST /v1/chat/completions or /v1/completions."""
        call = self.new_call(request, "/v1" + path)

        async def work() -> Response:
            await self.authenticate(call, request, ("chat",))
            raw = await read_body(request, self.rc.max_body_bytes)
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise ApiError(400, "request body is not valid JSON") from None
            validate_request(path, body)
            return await self.dispatch(request, path, body, call)

        return await self.run(call, work)

    def situation(self) -> Situation:
        return Situation(
            experiments=self.targets.experiments,
            targets=self.targets.of,
            ready=lambda t: self.guard.breaker(t.upstream, t.model).ready(),
            fallback=self.fallback,
            period=period(self.rc.schedule) if self.rc.schedule.periods else None,
            overloaded=self.guard.overloaded(),
        )

    async def dispatch(
        self,
        request: Request,
        path: str,
        body: dict[str, Any],
        call: Call,
        pattern: str | None = None,
        arm: str | None = None,
    ) -> Response:
        """A validated request through routing, cache and upstream (`pattern` forces a cache TTL pattern; `arm`:
        the router's own choice of arm, as a QA key's header would force it, e.g. the arena's)."""
        call.model = body["model"]
        if self.rc.audit.log_prompts:
            call.prompt = last_user_text(body)
        forced = arm or request.headers.get(self.rc.arm_header)
        qa = call.has_scope("qa") or call.has_scope("admin")
        if arm is None and forced is not None and self.keys is not None and not qa:
            raise ApiError(403, f"{self.rc.arm_header}: forcing an arm needs a key with the qa or admin scope")
        user = body["user"] if isinstance(body.get("user"), str) else call.key_id or call.caller
        r = route(call.model, user, forced, self.situation())
        call.arm, call.fallback, call.forced = r.arm, r.fallback, forced is not None
        call.routed_arm = r.routed or (r.arm if r.arm != "fallback" else None)
        call.version = r.target.version or r.target.model
        if r.fallback is not None:
            self.metrics.fallbacks.labels(r.fallback).inc()
        _, ttl = self.cache.policy(body, pattern)
        key = self.cache.key(body, r.target.model) if ttl else None
        call.cache = "miss" if key else "bypass"
        if key is not None and (hit := (await self.cache.get_many([key], call.arm))[0]) is not None:
            call.cache, call.response_id = "hit", usage_of(hit).get("id")
            self.remember(call)
            return Response(hit, 200, call.headers(), media_type="application/json")
        if body.get("stream"):
            resp = await unless_client_goes(request.receive, self.forward(call, with_usage(body), path, r, True))
            if resp.status != 200:  # the upstream's own error, passed on as it is
                data = await resp.read()
                resp.close()
                return self._passed_on(call, r, Answer(resp.status, data, "application/json"))
            call.streaming = True
            self._shadow(r, body, path, None, call.arm)
            wants = bool((body.get("stream_options") or {}).get("include_usage"))
            return RelayResponse(Relay(self, call, resp, wants), call.headers())
        answer: Answer = await unless_client_goes(request.receive, self.forward(call, body, path, r, False))
        if answer.status != 200:
            return self._passed_on(call, r, answer)
        call.usage = usage_of(answer.body)
        call.response_id = call.usage.get("id")
        self.remember(call)
        if key is not None and call.fallback != "upstream_error":
            self.spawn(self.cache.set_many({key: answer.body}, ttl, call.arm))  # off the request path
        self._shadow(r, body, path, answer.body, call.arm)
        return Response(answer.body, 200, call.headers(), media_type=answer.content_type)

    def _passed_on(self, call: Call, r: Route, answer: Answer) -> Response:
        """The upstream answered this request with an error: an OpenAI-shaped 4xx passes on as it is (any other
        4xx is put in that shape); a 500 (the upstream failed on this request, which it should not) is not
        retried and becomes our 502, with its message."""
        try:
            error = orjson.loads(answer.body)["error"]
            said = error["message"] if isinstance(error, dict) else None
        except (orjson.JSONDecodeError, KeyError, TypeError):
            said = None
        if answer.status < 500 and isinstance(said, str):
            call.status = answer.status
            return Response(answer.body, answer.status, call.headers(), media_type="application/json")
        said = said if isinstance(said, str) else answer.body[:300].decode(errors="replace")
        if answer.status < 500:
            raise ApiError(answer.status, f"upstream {r.target.upstream} answered {answer.status}: {said}")
        call.kind = "upstream_500"
        raise ApiError(502, f"upstream {r.target.upstream} failed on this request ({answer.status}): {said}")

    async def forward(self, call: Call, body: dict[str, Any], path: str, r: Route, stream: bool) -> Any:
        """The upstream's answer (an `Answer`, or the open streamed response); after the retries, the fallback's
        (never for a forced arm: QA asked for that arm's answer). Updates `call` when the fallback answered."""
        try:
            return await self._attempts(call.arm or "", r.target, path, body, stream)
        except UpstreamUnavailable as exc:
            if self.fallback is None or call.arm == "fallback" or call.forced:
                call.kind = exc.kind.split(":")[0]
                raise ApiError(exc.status, f"upstream {r.target.upstream} for arm {call.arm}: {exc.kind}") from None
        self.metrics.fallbacks.labels("upstream_error").inc()
        call.arm, call.version, call.fallback = "fallback", self.fallback.model, "upstream_error"
        try:
            return await self._attempts("fallback", self.fallback, path, body, stream)
        except UpstreamUnavailable as exc:
            call.kind = exc.kind.split(":")[0]
            raise ApiError(exc.status, f"upstream {r.target.upstream} and the fallback failed: {exc.kind}") from None

    async def _attempts(self, arm: str, target: Target, path: str, body: dict[str, Any], stream: bool) -> Any:
        """One call to `target`, retried while the upstream is unavailable; each attempt goes through the
        target's breaker and ends there however it ends (a cancelled attempt decides nothing)."""
        breaker = self.guard.breaker(target.upstream, target.model)
        payload = orjson.dumps({**body, "model": target.model})
        send = self.upstreams.open_stream if stream else self.upstreams.post
        self.guard.in_flight += 1
        started = time.perf_counter()
        try:
            for attempt_no in range(self.rc.resilience.retries + 1):
                attempt = breaker.attempt()
                if attempt is None:
                    raise UpstreamUnavailable("breaker_open", 503)
                with attempt:
                    try:
                        out = await send(target.upstream, path, payload)
                    except UpstreamUnavailable:
                        attempt.failed()
                        if attempt_no == self.rc.resilience.retries:
                            raise
                        self.metrics.retries.labels(arm, target.upstream).inc()
                        continue
                    attempt.ok()
                self.guard.observe(time.perf_counter() - started)
                return out
            raise AssertionError("unreachable: the last attempt returns or raises")
        finally:
            self.guard.in_flight -= 1
            self.metrics.breaker_open.labels(target.upstream, target.model).set(float(breaker.state != "closed"))

    def _shadow(self, r: Route, body: dict[str, Any], path: str, returned: bytes | None, arm: str | None) -> None:
        """A copy for the shadow arm, off the request path, while fewer than `shadow_concurrency` are in flight."""
        exp = r.experiment
        if not exp.shadow or exp.shadow == arm:
            return
        if self.shadow_slots.locked():
            self.metrics.shadow_dropped.labels(exp.shadow).inc()
            return

        async def bounded() -> None:
            async with self.shadow_slots:
                await shadow(self, exp, body, path, returned)

        self.spawn(bounded())

    def remember(self, call: Call) -> None:
        """The response's arm, version and key, for feedback on it."""
        if call.response_id:
            self.recent[call.response_id] = (call.arm or "", call.version or "", call.key_id)
            if len(self.recent) > RECENT_KEEP:
                self.recent.popitem(last=False)


class FastPath:
    """POST /v1/chat/completions and /v1/completions go straight to `Router.openai`, past FastAPI's routing and
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
        response = await self.router.openai(Request(scope, receive), path)
        await response(scope, receive, send)


def _database(cfg: ServingConfig, url: str | None) -> str | None:
    """The database of keys, audit rows, feedback and the frontend's data: `url`, else DATABASE_URL or the
    embedded one when keys or audit need it at start (checked to be migrated), else none."""
    if url is None and not (cfg.router.auth.required or cfg.router.audit.enabled):
        return None
    from fibreflow.core.db import check_schema, connect, database_url, load_db_config

    url = url or database_url(load_db_config())
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
    on_stop: Callable[[], None] | None = None,
) -> FastAPI:
    """The router app. `redis_url` (default: $REDIS_URL; "" = none) backs the cache and the limits; the database
    (default: DATABASE_URL or the embedded one) holds keys, audit rows, feedback and experiments; `watch` follows
    registry aliases; `on_stop` runs last when the app shuts down (what `fibreflow serve` started for it)."""
    from fibreflow.serving.admin import ExperimentStore, admin_routes
    from fibreflow.serving.api import metrics_listener, openai_routes, ops_routes
    from fibreflow.serving.arena import arena_routes
    from fibreflow.serving.embeddings import embeddings_routes
    from fibreflow.serving.feedback import feedback_routes
    from fibreflow.serving.fibreflow_api import Resources, frontend_routes

    redis_url = redis_url if redis_url is not None else os.environ.get("REDIS_URL")
    router = Router(cfg, redis_url, _database(cfg, database_url), alias_hook)
    experiments, resources = ExperimentStore(router), Resources(router)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if router.pool is not None:
            await router.pool.open(wait=False)
        await router.upstreams.start()
        if router.audit is not None:
            router.audit.start()
        await experiments.start()
        metrics_server = metrics_listener(router)
        if watch:
            await asyncio.to_thread(router.start_watching)
        yield
        if router.watcher is not None:
            router.watcher.stop()
        await experiments.stop()
        if router._tasks:
            await asyncio.wait(router._tasks, timeout=10)
        if router.audit is not None:
            await router.audit.close()  # a clean shutdown loses no audit row
        if metrics_server is not None:
            metrics_server.shutdown()
        await router.upstreams.close()
        await router.cache.close()
        await router.limiter.close()
        if router.keys is not None:
            await router.keys.close()
        if router.pool is not None:
            await router.pool.close()
        await asyncio.to_thread(resources.close)
        if on_stop is not None:
            await asyncio.to_thread(on_stop)

    docs = cfg.router.docs
    app = FastAPI(
        title="FibreFlow router",
        version="1",
        lifespan=lifespan,
        description="OpenAI-compatible A/B router in front of the FibreFlow assistant's upstreams.",
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
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
    for routes in (
        openai_routes(router),
        feedback_routes(router),
        arena_routes(router),
        frontend_routes(router, resources),
        embeddings_routes(router, resources),
        admin_routes(router, experiments),
        ops_routes(router),
    ):
        app.include_router(routes)
    return app
