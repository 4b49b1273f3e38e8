"""The OpenAI API as both servers speak it: request models, response and stream-chunk shapes, errors.

Errors always have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so the `openai` SDK and
LangChain raise their usual exceptions with our message.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

T = TypeVar("T")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    499: "client_closed_request",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


class ApiError(Exception):
    """Raised anywhere in a request; answered as an OpenAI-shaped error with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(
        orjson.loads(error_body(exc.status, exc.message, exc.param, exc.code)), exc.status, headers=exc.headers
    )


def invalid_request(exc: ValidationError | RequestValidationError) -> ApiError:
    """A 400 naming the first field at fault (`messages.0.content`), as OpenAI does."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "body")
    if first["type"] == "json_invalid":
        return ApiError(400, "request body is not valid JSON")
    return ApiError(400, f"{loc}: {first['msg']}" if loc else first["msg"], param=loc or None)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape: ours, FastAPI's validation errors (400, naming the field), 404s."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(invalid_request(exc))

    async def http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http)


class _Open(BaseModel):
    """Strict types for the fields we know (a string is not a number, a list is not a string); other fields are
    allowed through (clients send many, and an upstream like vLLM may support them)."""

    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Open):
    include_usage: bool = False


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ContentPart(_Open):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text content part needs `text` (a string)")
        return self


class Function(_Open):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(_Open):
    """An entry of `tools`: a function the model may call."""

    type: Literal["function"]
    function: Function


class FunctionName(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Open):
    name: str
    arguments: str  # a JSON object as a string, as OpenAI sends it


class ToolCallSpec(_Open):
    """A call in an assistant turn of the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallSpec] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts carry meaning for a text model
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""

    def chat(self) -> dict[str, Any]:
        """The turn as a chat template reads it: text content, and tool calls with their ids."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class _Request(_Open):
    """Fields both OpenAI endpoints share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(cls, choice: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        if choice not in (None, "none", "auto") and not tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        return choice

    @property
    def offered_tools(self) -> list[dict[str, Any]]:
        """The tools the model is shown (none for tool_choice "none"), as a chat template reads them."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("at least one prompt")
        return prompt


REQUESTS: dict[str, type[_Request]] = {"/chat/completions": ChatRequest, "/completions": CompletionRequest}


def validate_request(path: str, body: Any) -> _Request:
    """The parsed JSON body of an OpenAI call, checked field by field; a 400 naming the field otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return REQUESTS[path].model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc) from None


class ClientGone(Exception):
    """The client disconnected before its answer was ready (audited as status 499)."""


async def client_gone(receive: Any) -> None:
    """Returns once the client has disconnected. Only after the request body has been read: from then on the ASGI
    server's `receive` yields nothing but the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_goes(receive: Any, work: Awaitable[T]) -> T:
    """`work`'s result, or `ClientGone` once the client disconnects first (then `work` is cancelled: an upstream
    call closes its connection, and the upstream stops generating for nobody)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(client_gone(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone
    finally:
        gone.cancel()
        if not task.done():  # we were cancelled ourselves
            task.cancel()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its iterator however the response ends (the client left, the send failed):
    the generator's `finally` runs now, not whenever the garbage collector gets to it."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await asyncio.shield(aclose())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_response(rid: str, model: str, text: str, finish: str, prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage(prompt, completion),
    }


def completion_response(rid: str, model: str, text: str, finish: str, prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        "usage": usage(prompt, completion),
    }


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }


def usage_chunk(rid: str, model: str, obj: str, prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt, completion),
    }


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class Feedback(BaseModel):
    response_id: str
    score: float | None = Field(default=None, ge=0, le=1)
    thumbs: Literal["up", "down"] | None = None
    comment: str | None = Field(default=None, max_length=2000)

    @model_validator(mode="after")
    def _one(self) -> Feedback:
        if (self.score is None) == (self.thumbs is None):
            raise ValueError("give exactly one of score (0..1) or thumbs (up|down)")
        return self

    @property
    def value(self) -> float:
        return self.score if self.score is not None else float(self.thumbs == "up")
