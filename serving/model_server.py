"""`fibreflow serve-model`: the embedded CPU upstream, an OpenAI-compatible server on transformers + peft.

One base model and several LoRA adapters (like vLLM's `--lora-modules`), batching of concurrent requests
(serving/engine.py), `/v1/chat/completions`, `/v1/completions` (both with SSE streaming and usage counts),
`/v1/models`, and vLLM's runtime adapter endpoints `/v1/load_lora_adapter` / `/v1/unload_lora_adapter`, so the
router drives this server and vLLM the same way. `/metrics` (Prometheus, no token, like vLLM's): queue wait, rows
per batch, time to first token and per output token, tokens generated. With an embedding model
(`model_server.embeddings`), `/v1/embeddings` too: the router's embeddings upstream when it runs without torch.

Like vLLM with `--api-key`, every /v1 route needs the shared upstream token (`Authorization: Bearer ...`) when one
is set; adapters are loaded at run time only from the project's artifact store (`var/models/artifacts`, where
registered versions are downloaded), never from any folder a caller names. A client that goes away stops its
generation; input that cannot be served gets a 400 naming the field, never a 500. A forced tool call (`tool_choice`
"required" or named) and a JSON `response_format` are kept by constrained decoding (serving/grammar.py), as vLLM
keeps them: the answer parses as promised, with arguments valid against the tool's parameters.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fibreflow.core.chat import held_back, parse_tool_calls
from fibreflow.serving.config import MERGED_DIR, ServingConfig, served_name
from fibreflow.serving.embeddings import EmbeddingsRequest, check_request, embeddings_response
from fibreflow.serving.engine import Engine, EngineError, Finished, Sampling, TooLong, UnknownModel
from fibreflow.serving.grammar import GrammarError, json_grammar, tool_calls_grammar
from fibreflow.serving.metrics import ModelMetrics
from fibreflow.serving.protocol import (
    SSE_DONE,
    ApiError,
    ChatRequest,
    ClientGone,
    ClosingStreamingResponse,
    CompletionRequest,
    NamedToolChoice,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_response,
    install_error_handlers,
    new_id,
    sse,
    unless_client_goes,
    usage_chunk,
)
from fibreflow.training.weights import Weights, weights
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

UNSUPPORTED = ("functions", "logprobs", "top_logprobs", "logit_bias")  # vLLM has them; this server not


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=200)


def _refuse_unsupported(req: ChatRequest | CompletionRequest) -> None:
    fields = req.model_dump(exclude_unset=True) | (req.model_extra or {})
    if req.n != 1:
        raise ApiError(400, "n > 1 is not supported by the local model server", param="n")
    for key in UNSUPPORTED:
        if fields.get(key) not in (None, False, [], {}):
            raise ApiError(400, f"{key} is not supported by the local model server (vLLM supports it)", param=key)
    for i, m in enumerate(getattr(req, "messages", [])):
        if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
            raise ApiError(400, "only text content parts: this is a text model", param=f"messages.{i}.content")


class TokenCheck:
    """Every /v1 route needs the shared upstream token (as vLLM's --api-key); /health does not."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await error_response(ApiError(401, "this upstream needs its token (Authorization: Bearer ...)"))(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


def create_model_app(
    engine: Engine,
    default_max_tokens: int = 256,
    *,
    token: str | None = None,
    adapter_roots: tuple[Path, ...] = (),
    embedder: Any = None,
    max_embedding_inputs: int = 256,
    merged: dict[str, Engine] | None = None,
) -> FastAPI:
    """The app around `engine` (the base and its adapters) and the `merged` engines (a version with its adapter
    folded in, by served name); with `token`, /v1 needs it; adapters load at run time only from `adapter_roots`;
    with `embedder` (datasets.embedding.Embedder), /v1/embeddings."""
    merged = merged or {}

    def pick(model: str) -> Engine:
        return merged.get(model, engine)

    app = FastAPI(title="FibreFlow local model server", version="1")
    install_error_handlers(app)
    if token:
        app.add_middleware(TokenCheck, token=token)
    roots = tuple(r.resolve() for r in adapter_roots)

    def budget(req: ChatRequest | CompletionRequest, ids: list[int]) -> int:
        asked = req.max_completion_tokens or req.max_tokens
        return asked or max(1, min(default_max_tokens, engine.max_context - len(ids)))

    def sampling(req: ChatRequest | CompletionRequest) -> Sampling:
        return Sampling(req.temperature, req.top_p if req.temperature > 0 else 1.0, req.seed)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engines = [engine, *merged.values()]
        return {"status": "ok", "models": [m for e in engines for m in e.models()],
                "batches": sum(e.batches for e in engines), "rows": sum(e.rows for e in engines)}  # fmt: skip

    @app.get("/metrics")
    async def metrics() -> Response:  # like vLLM's: outside /v1, so without the upstream token
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if embedder is not None:
        lock = threading.Lock()  # one encode at a time

        def embed(texts: list[str]) -> tuple[Any, int]:
            with lock:
                return embedder.embed(texts)

        @app.post("/v1/embeddings")
        async def embeddings(req: EmbeddingsRequest) -> Response:
            texts = check_request(req, embedder.spec, max_embedding_inputs)
            vectors, tokens = await asyncio.to_thread(embed, texts)
            return embeddings_response(embedder.spec, list(vectors), tokens, req.encoding_format)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        def card(name: str, parent: str | None, root: str) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": engine.created,
                "owned_by": "fibreflow",
                "root": root,
                "parent": parent,
                "max_model_len": engine.max_context,
            }

        data = [card(engine.base_name, None, engine.base_name)]
        data += [card(n, engine.base_name, p) for n, p in engine.adapters.items()]
        data += [card(n, None, f"{n} (merged)") for n in merged]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadAdapter) -> dict[str, str]:
        if not any(Path(body.lora_path).resolve().is_relative_to(r) for r in roots):
            allowed = ", ".join(map(str, roots)) or "none (runtime loading is off)"
            raise ApiError(403, f"adapters load only from the artifact store ({allowed})", param="lora_path")
        if body.lora_name in merged:
            raise ApiError(400, f"{body.lora_name} is served merged here already", param="lora_name")
        try:
            await asyncio.to_thread(engine.load_adapter, body.lora_name, body.lora_path)
        except EngineError as exc:
            raise ApiError(400, str(exc), param="lora_path") from None
        return {"status": "loaded", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadAdapter) -> dict[str, str]:
        try:
            await asyncio.to_thread(engine.unload_adapter, body.lora_name)
        except EngineError as exc:
            raise ApiError(404, str(exc), param="lora_name") from None
        return {"status": "unloaded", "lora_name": body.lora_name}

    async def serve(
        req: ChatRequest | CompletionRequest,
        request: Request,
        ids: list[int],
        rid: str,
        obj: str,
        chunk: Callable[[str, str | None, bool], dict[str, Any] | None],
        whole: Callable[..., dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
    ) -> Any:
        _refuse_unsupported(req)
        max_tokens = budget(req, ids)
        engine = pick(req.model)
        try:
            engine.check(req.model, ids, max_tokens)
        except UnknownModel as exc:
            raise ApiError(404, str(exc), param="model", code="model_not_found") from None
        except TooLong as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        constraint = None
        if (grammar := grammar_for(req, tools or [])) is not None:
            try:
                constraint = await asyncio.to_thread(engine.constraint, grammar[0])
            except GrammarError as exc:
                raise ApiError(400, f"cannot constrain the answer to it: {exc}", param=grammar[1]) from None
        if not req.stream:
            generation = engine.complete(req.model, ids, max_tokens, sampling(req), req.stops, constraint)
            try:
                text, fin = await unless_client_goes(request.receive, generation)
            except ClientGone:
                return Response(status_code=499)
            return JSONResponse(whole(rid, req.model, text, fin.reason, fin.prompt_tokens, fin.completion_tokens))

        async def events() -> AsyncIterator[bytes]:
            yield sse(chunk("", None, True) or {})
            async for item in engine.stream(req.model, ids, max_tokens, sampling(req), req.stops, constraint):
                if isinstance(item, Finished):
                    yield sse(chunk("", item.reason, False) or {})
                    if req.include_usage:
                        yield sse(usage_chunk(rid, req.model, obj, item.prompt_tokens, item.completion_tokens))
                elif (c := chunk(item, None, False)) is not None:
                    yield sse(c)
            yield SSE_DONE

        return ClosingStreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        tools, eng = req.offered_tools, pick(req.model)
        try:
            ids = eng.chat_ids([m.chat() for m in req.messages], tools)
        except EngineError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        rid = new_id("chatcmpl")
        calls = ToolCallStream() if tools else None

        def chunk(text: str, finish: str | None, first: bool) -> dict[str, Any] | None:
            if first:
                return chat_chunk(rid, req.model, {"role": "assistant", "content": ""}, None)
            delta, reason = calls.step(text, finish) if calls else ({"content": text} if text else {}, finish)
            return chat_chunk(rid, req.model, delta, reason) if delta or reason else None

        def whole(rid: str, model: str, text: str, finish: str, prompt: int, completion: int) -> dict[str, Any]:
            body = chat_response(rid, model, text, finish, prompt, completion)
            content, found = parse_tool_calls(text) if tools else (text, [])
            if found:
                body["choices"][0]["message"] = {"role": "assistant", "content": content,
                                                 "tool_calls": [c.openai() for c in found]}  # fmt: skip
                body["choices"][0]["finish_reason"] = "tool_calls"
            return body

        return await serve(req, request, ids, rid, "chat.completion.chunk", chunk, whole, tools)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise ApiError(400, "one prompt per request on the local model server", param="prompt")
            req.prompt = req.prompt[0]
        rid = new_id("cmpl")

        def chunk(text: str, finish: str | None, first: bool) -> dict[str, Any]:
            return completion_chunk(rid, req.model, text, finish)

        ids = pick(req.model).text_ids(req.prompt)
        return await serve(req, request, ids, rid, "text_completion", chunk, completion_response)

    return app


def grammar_for(req: ChatRequest | CompletionRequest, tools: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(the grammar the answer must follow, the field that asks for it): calls of the offered `tools` for
    tool_choice "required" or a named tool, JSON for a JSON response_format; None when the answer is free."""
    choice, fmt = req.tool_choice, req.response_format
    if tools and choice == "required":
        return tool_calls_grammar(tools), "tools"
    if tools and isinstance(choice, NamedToolChoice):
        return tool_calls_grammar(tools, choice.function.name), "tools"
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_grammar(), "response_format"
    schema = (fmt.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise ApiError(400, "json_schema needs its schema: {name, schema: {...}}", param="response_format.json_schema")
    return json_grammar(schema), "response_format.json_schema"


class ToolCallStream:
    """A streamed answer with tools offered: text streams as content until a `<tool_call>` tag may begin; the
    calls leave whole in the last chunk (finish_reason "tool_calls"), or, when they do not parse, as content."""

    def __init__(self) -> None:
        self.text, self.sent = "", 0

    def step(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        self.text += text
        if finish is None:
            upto = held_back(self.text)
            delta = {"content": self.text[self.sent : upto]} if upto > self.sent else {}
            self.sent = max(self.sent, upto)
            return delta, None
        content, calls = parse_tool_calls(self.text)
        if not calls:
            rest = self.text[self.sent :]
            return ({"content": rest} if rest else {}), finish
        delta: dict[str, Any] = {"tool_calls": [{"index": i, **c.openai()} for i, c in enumerate(calls)]}
        if content and len(content) > self.sent:
            delta["content"] = content[self.sent :]
        return delta, "tool_calls"


def registry_adapters(cfg: ServingConfig) -> dict[str, tuple[str, Weights]]:
    """Served name -> (alias, weights) of each configured alias that is set (`fibreflow-assistant-v3` for
    @champion = v3)."""
    import mlflow
    from fibreflow.core.tracking import setup_mlflow

    setup_mlflow("fibreflow-serving")
    client, found = mlflow.MlflowClient(), {}
    for alias in cfg.model_server.registry_aliases:
        try:
            mv = client.get_model_version_by_alias(cfg.registered_model, alias)
        except mlflow.exceptions.MlflowException:
            continue  # not set (yet): nothing to load for it
        name = served_name(cfg.registered_model, mv.version)
        if name not in found:
            found[name] = (alias, weights(f"models:/{cfg.registered_model}/{mv.version}"))
    return found


def build_engine(
    cfg: ServingConfig, model: str | None = None, loras: dict[str, str] | None = None, registry: bool = True
) -> tuple[Engine, dict[str, Engine]]:
    """The base (as the adapters were trained on it: 4-bit for QLoRA) with every adapter loaded, and an engine of
    its own for each version of `model_server.merged_aliases` (its adapter folded into the dequantized base:
    training/merge.py, the path vLLM's merged arms take; about twice as fast here as LoRA on the 4-bit base)."""
    from fibreflow.core.errors import ConfigError
    from fibreflow.training.weights import folder_quantization, load_local

    ms = cfg.model_server
    base = weights(model or ms.model)
    found = registry_adapters(cfg) if registry else {}
    metrics = ModelMetrics()
    merged = {name: _merged_engine(cfg, name, w, metrics) for name, (alias, w) in found.items()
              if alias in ms.merged_aliases}  # fmt: skip
    adapters = {name: w for name, (_, w) in found.items() if name not in merged}
    for name, path in (loras or {}).items():
        adapters[name] = Weights(base.base, path, {}, folder_quantization(Path(path)))
    for name, w in adapters.items():
        if Path(w.base).resolve() != Path(base.base).resolve():
            raise ConfigError(
                f"adapter {name} was trained on {w.base}, not on the served base {base.base}; "
                "serve it from its own model server (--model)"
            )
    quants = {w.quantization for w in adapters.values()}
    if len(quants) > 1:
        raise ConfigError("the adapters were trained on differently quantized bases; one server serves one base")
    q = quants.pop() if quants else None
    net, tok = load_local(Weights(base.base, None, base.identity, q), ms.dtype)
    base_name = model or ms.model
    max_context = int(getattr(net.config, "max_position_embeddings", 2048))
    engine = Engine(
        net,
        tok,
        base_name=Path(base_name).name,
        max_context=max_context,
        max_batch=ms.max_batch,
        batch_wait_ms=ms.batch_wait_ms,
        metrics=metrics,
    )
    for name, w in adapters.items():
        assert w.adapter is not None
        engine.load_adapter(name, w.adapter)
    return engine, merged


def _merged_engine(cfg: ServingConfig, name: str, w: Weights, metrics: ModelMetrics) -> Engine:
    """Version `name` merged (written once under var/serving/merged, reused after) on an engine of its own."""
    from fibreflow.core.config import dtype_name, resolve_path
    from fibreflow.training.merge import merged_folder
    from fibreflow.training.weights import load_local

    ms = cfg.model_server
    dtype = dtype_name(ms.dtype)
    folder = merged_folder(w, resolve_path(MERGED_DIR), dtype, label=name)
    net, tok = load_local(Weights(str(folder), None, {"kind": "merged", "version": name}), dtype)
    max_context = int(getattr(net.config, "max_position_embeddings", 2048))
    return Engine(net, tok, base_name=name, max_context=max_context, max_batch=ms.max_batch,
                  batch_wait_ms=ms.batch_wait_ms, metrics=metrics)  # fmt: skip


def serve_model(
    cfg: ServingConfig, model: str | None = None, loras: dict[str, str] | None = None, registry: bool = True
) -> None:
    """Load, then serve until interrupted (uvicorn)."""
    import uvicorn
    from fibreflow.core.config import resolve_path
    from fibreflow.datasets.embedding import Embedder
    from fibreflow.training.weights import ARTIFACTS_DIR

    engine, merged = build_engine(cfg, model, loras, registry)
    ms = cfg.model_server
    token = os.environ.get(ms.api_key_env) if ms.api_key_env else None
    embedder = Embedder(ms.embeddings) if ms.embeddings else None
    app = create_model_app(engine, cfg.max_new_tokens, token=token, adapter_roots=(resolve_path(ARTIFACTS_DIR),),
                           embedder=embedder, max_embedding_inputs=cfg.router.embeddings.max_inputs,
                           merged=merged)  # fmt: skip
    try:
        uvicorn.run(app, host=cfg.model_server.host, port=cfg.model_server.port, log_level="warning")
    finally:
        for e in (engine, *merged.values()):
            e.close()
