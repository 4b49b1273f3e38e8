"""The arena: people compare two arms' answers to the same question, blind, and vote.

`GET /arena` is a self-contained page (`arena.html`: no build step, nothing from a CDN). It asks for a key once
(kept in the tab's session storage) and talks to two routes, both for a key with the chat scope:
- `POST /v1/arena/battles` {question, model?, max_tokens?}: two different arms of the experiment (among those that
  can answer now), in random order, each forced like a QA key would force it (its own answer or an error, never
  the fallback's). Each answer is a request of its own: its own response id and audit row (endpoint
  `/v1/arena/battles`, so the A/B report keeps them out of the split's traffic). The arms are not named.
- `POST /v1/arena/votes` {a, b, vote: a | b | tie | both_bad}: feedback on both responses in one transaction
  (the preferred 1 and the other 0; a tie 0.5 each; both bad 0 each), then the names revealed. The A/B report
  counts these votes with the rest of the feedback.
"""

from __future__ import annotations

import asyncio
import random
import time
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fibreflow.serving.audit import Call
from fibreflow.serving.feedback import Vote, rated, record
from fibreflow.serving.guard import CurrentCall, guarded
from fibreflow.serving.protocol import ApiError
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from fibreflow.serving.router import Router

BATTLES = "/v1/arena/battles"
SCORES = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5), "both_bad": (0.0, 0.0)}
PAGE_HEADERS = {  # the page needs nothing but itself and this router
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Battle(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=4000)
    model: str | None = Field(default=None, max_length=256)  # the experiment (default: the first)
    max_tokens: int | None = Field(default=None, ge=1, le=2048)


class ArenaVote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: str = Field(min_length=1, max_length=256)  # the response id shown as A
    b: str = Field(min_length=1, max_length=256)
    vote: Literal["a", "b", "tie", "both_bad"]

    @model_validator(mode="after")
    def _two(self) -> ArenaVote:
        if self.a == self.b:
            raise ValueError("a and b must be two different responses")
        return self


def page() -> str:
    return files("fibreflow.serving").joinpath("arena.html").read_text(encoding="utf-8")


def arena_routes(router: Router) -> APIRouter:
    from fibreflow.serving.router import CHAT

    html = page()
    api = APIRouter(route_class=guarded(("chat",)))

    @api.post(BATTLES, summary="Two arms' answers to one question, blind and in random order")
    async def battle(req: Battle, request: Request, call: CurrentCall) -> Response:
        model = req.model or next(iter(router.targets.experiments), None)
        if model is None or model not in router.targets.experiments:
            raise ApiError(404, f"no experiment serves model {model!r}", param="model")
        now = router.situation()
        arms = sorted(name for name, target in router.targets.of(model).items() if now.ready(target))
        if len(arms) < 2:
            raise ApiError(409, f"the arena needs two arms of {model} that can answer now; it has {arms or 'none'}",
                           param="model")  # fmt: skip
        messages = [{"role": "user", "content": req.question}]
        tokens = req.max_tokens or router.cfg.max_new_tokens
        body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": tokens,
                "user": call.key_id or call.caller}  # fmt: skip

        async def answer(arm: str) -> tuple[Call, Response]:
            own = Call(time.perf_counter(), BATTLES, call.caller, key_id=call.key_id, key=call.key)
            return own, await router.run(own, lambda: router.dispatch(request, CHAT, dict(body), own, arm=arm))

        shown = random.sample(arms, 2)  # which two, and which is A
        answers = await asyncio.gather(*(answer(arm) for arm in shown))
        call.finished = True  # each answer has its own metrics and audit row
        for _, resp in answers:
            if resp.status_code != 200:
                return resp  # that arm's error, in OpenAI's shape
        out = [{"id": own.response_id, "content": orjson.loads(resp.body)["choices"][0]["message"]["content"]}
               for own, resp in answers]  # fmt: skip
        return JSONResponse({"model": model, "answers": out})

    @api.post("/v1/arena/votes", summary="A / B / tie / both bad: feedback on both responses, then their arms")
    async def vote(v: ArenaVote, call: CurrentCall) -> dict[str, Any]:
        a, b = await rated(router, v.a, call, "a"), await rated(router, v.b, call, "b")
        score_a, score_b = SCORES[v.vote]
        thumbs = {1.0: "up", 0.0: "down"}
        sides = ((v.a, a, score_a, v.b), (v.b, b, score_b, v.a))
        votes = [Vote(rid, arm, version, score, thumbs.get(score), f"arena: {v.vote} (against {other})")
                 for rid, (arm, version, _), score, other in sides]  # fmt: skip
        await record(router, call, votes)
        call.response_id = v.a
        return {"status": "recorded", "vote": v.vote} | {
            side: {"response_id": x.response_id, "arm": x.arm, "model_version": x.version, "score": x.score}
            for side, x in zip("ab", votes, strict=True)
        }

    routes = APIRouter()

    @routes.get("/arena", summary="The arena page: two arms' answers side by side, blind; then a vote")
    async def arena_page() -> HTMLResponse:
        return HTMLResponse(html, headers=PAGE_HEADERS)

    routes.include_router(api)
    return routes
