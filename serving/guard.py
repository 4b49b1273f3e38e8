"""What every API route of the router goes through, in this order: the call is opened (one audit row, one set of
metrics, whatever happens next), the key is checked for the route's scope and its limits, the body is read
within the one size limit (refused from its Content-Length before reading, counted while reading: chunked or
lying bodies too), and only then parsed and handled.

FastAPI reads and validates a route's body before any dependency runs, so the check runs in the route class
(`guarded(scopes)`, used by every APIRouter of the router): the body is read here and FastAPI finds it read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fibreflow.serving.audit import Call
from fibreflow.serving.protocol import ApiError

if TYPE_CHECKING:
    from fibreflow.serving.router import Router

BODY_METHODS = ("POST", "PUT", "PATCH")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most `limit` bytes: 413 from the declared length before reading, or as soon as the
    bytes received pass the limit (a chunked body declares none, a lying one declares too few)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared[:40]!r} is not a number of bytes")
        if int(declared) > limit:
            raise ApiError(413, f"request body is {declared} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's own cache of the body: FastAPI's handler reads it from there
    return body


def current_call(request: Request) -> Call:
    """The open call of this request (a FastAPI dependency): endpoints fill in model, arm, usage."""
    return request.state.call


CurrentCall = Annotated[Call, Depends(current_call)]


def guarded(scopes: tuple[str, ...]) -> type[APIRoute]:
    """A route class: the key must hold one of `scopes` (none: any valid key), checked before the body is read."""

    class Guarded(APIRoute):
        def get_route_handler(self) -> Any:
            handle = super().get_route_handler()
            endpoint = self.path_format

            async def handler(request: Request) -> Any:
                router: Router = request.app.state.router
                call = request.state.call = router.new_call(request, endpoint)

                async def work() -> Any:
                    await router.authenticate(call, request, scopes)
                    if request.method in BODY_METHODS:
                        await read_body(request, router.rc.max_body_bytes)
                    return await handle(request)

                return await router.run(call, work)

            return handler

    return Guarded
