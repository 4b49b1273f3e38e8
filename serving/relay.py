"""A streamed answer passed from the upstream to the client, event by event.

The upstream is always asked for its usage (`stream_options.include_usage`): the token limits count the real
prompt and completion tokens. The usage-only last chunk is passed on only to clients that asked for it. However
the stream ends, the call is finished exactly once: status 200 when the upstream's stream ended, 499 when the
client left first (also before the first event), 504 when the upstream went quiet for longer than its read
timeout; and the upstream connection is closed, so the upstream stops generating for nobody.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from fastapi.responses import StreamingResponse
from fibreflow.serving.audit import Call
from fibreflow.serving.protocol import error_body

if TYPE_CHECKING:
    from fibreflow.serving.router import Router

TEXT_MARKS, EMPTY_MARKS = (b'"content":"', b'"text":"'), (b'"content":""', b'"text":""')


def with_usage(body: dict[str, Any]) -> dict[str, Any]:
    """The body to send upstream for a stream: usage asked for, whatever the client asked."""
    return body | {"stream_options": (body.get("stream_options") or {}) | {"include_usage": True}}


class Relay:
    def __init__(self, router: Router, call: Call, upstream: aiohttp.ClientResponse, client_wants_usage: bool) -> None:
        self.router, self.call, self.upstream, self.client_wants_usage = router, call, upstream, client_wants_usage
        self.first_token: float | None = None
        self.chunks = 0  # text-carrying chunks: the token count when the upstream reports no usage
        self.usage: dict[str, Any] | None = None
        self.response_id: str | None = None
        self.outcome: tuple[int, str | None] = (499, "the client disconnected")  # until the stream ends
        self.closed = False

    async def events(self) -> AsyncIterator[bytes]:
        buffer = b""
        try:
            async for data in self.upstream.content.iter_any():
                *events, buffer = (buffer + data).split(b"\n\n")
                out = [e + b"\n\n" for e in events if e and self._read(e)]
                if out:
                    yield b"".join(out)
            if buffer.strip():
                yield buffer
            self.outcome = (200, None)
        except (aiohttp.ClientError, TimeoutError) as exc:  # the upstream died or went quiet mid-stream
            kind = "timed out" if isinstance(exc, TimeoutError) else f"failed ({type(exc).__name__})"
            self.outcome = (504 if isinstance(exc, TimeoutError) else 502, f"the upstream stream {kind}")
            yield b"data: " + error_body(self.outcome[0], self.outcome[1] or "") + b"\n\n"
        finally:
            self.close()

    def _read(self, event: bytes) -> bool:
        """Note what the event says (first token, response id, usage); False for an event not to pass on."""
        if self.response_id is None and (i := event.find(b'"id":"')) >= 0:
            self.response_id = event[i + 6 : event.find(b'"', i + 6)].decode(errors="replace")
        tokens = sum(event.count(m) for m in TEXT_MARKS) - sum(event.count(m) for m in EMPTY_MARKS)
        if tokens > 0:
            self.chunks += tokens
            if self.first_token is None:
                self.first_token = time.perf_counter()
                self.router.metrics.ttft.labels(self.call.arm or "").observe(self.first_token - self.call.started)
        if b'"usage":{' in event:
            try:
                obj = orjson.loads(event.removeprefix(b"data: "))
            except orjson.JSONDecodeError:
                return True
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                self.usage = obj["usage"]
                return self.client_wants_usage or bool(obj.get("choices"))
        return True

    def close(self) -> None:
        """Finish the call once (synchronous: it also runs while the stream is being cancelled)."""
        if self.closed:
            return
        self.closed = True
        self.upstream.close()  # unread content: the connection is dropped, the upstream sees the client go
        call = self.call
        call.status, call.error = self.outcome
        call.usage = self.usage or {"completion_tokens": self.chunks}
        call.response_id = self.response_id
        self.router.remember(call)
        self.router.finish(call)


class RelayResponse(StreamingResponse):
    """A StreamingResponse that closes its relay however the response ends, even if it never started (the client
    left before the first event)."""

    def __init__(self, relay: Relay, headers: dict[str, str]) -> None:
        super().__init__(relay.events(), 200, headers, media_type="text/event-stream")
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.relay.close()
