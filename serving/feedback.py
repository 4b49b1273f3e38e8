"""`POST /v1/feedback`: a score (0..1) or thumbs up/down on a response, stored in Postgres (`feedback`).

Needs a key with the chat scope; one vote per response and caller (a later vote replaces the earlier one). The
response must have been served to the caller's own key (an admin key may rate any), found in this router's
recent responses or in the audit log (every audit row names its response id), so a vote always names the arm
and model version that answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fibreflow.serving.audit import Call
from fibreflow.serving.guard import CurrentCall, guarded
from fibreflow.serving.protocol import ApiError, Feedback

if TYPE_CHECKING:
    from fibreflow.serving.router import Router

UPSERT = """
INSERT INTO feedback (response_id, caller, arm, model_version, score, thumbs, comment)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (response_id, caller) DO UPDATE
SET arm = EXCLUDED.arm, model_version = EXCLUDED.model_version, score = EXCLUDED.score, thumbs = EXCLUDED.thumbs,
    comment = EXCLUDED.comment, at = now()
"""
SERVED = """
SELECT arm, model_version, key_id FROM request_audit
WHERE response_id = %s AND status = 200 AND arm IS NOT NULL ORDER BY at LIMIT 1
"""


@dataclass(frozen=True)
class Vote:
    """One feedback row: the response, who answered it, the score (0..1) and thumbs (None: neither)."""

    response_id: str
    arm: str
    version: str
    score: float
    thumbs: str | None
    comment: str | None


async def answered(router: Router, response_id: str) -> tuple[str, str, str | None] | None:
    """(arm, model version, key id) of a response this router or another one served, or None."""
    found = router.recent.get(response_id)
    if found is not None or router.pool is None:
        return found
    async with router.pool.connection(timeout=3) as conn:
        row = await (await conn.execute(SERVED, (response_id,))).fetchone()
    return (row[0], row[1], row[2]) if row else None


async def rated(router: Router, response_id: str, call: Call, param: str) -> tuple[str, str, str | None]:
    """(arm, version, key id) of a response the caller may rate: served to its own key (an admin key: any)."""
    if router.pool is None:
        raise ApiError(503, "feedback is kept in Postgres: serve with a database (DATABASE_URL or the embedded)")
    found = await answered(router, response_id)
    if found is None:
        raise ApiError(404, f"no response with id {response_id!r} was served here", param=param)
    if router.keys is not None and found[2] != call.key_id and not call.has_scope("admin"):
        raise ApiError(403, "a response can be rated only with the key it was served to", param=param)
    return found


async def record(router: Router, call: Call, votes: list[Vote]) -> None:
    """Store the caller's votes in one transaction (all or none), then count them."""
    caller = call.key_id or f"ip:{call.caller}"
    async with router.pool.connection(timeout=3) as conn, conn.transaction():
        for v in votes:
            await conn.execute(UPSERT, (v.response_id, caller, v.arm, v.version, v.score, v.thumbs, v.comment))
    for v in votes:
        router.metrics.feedback.labels(v.arm, v.version).inc()
        router.metrics.feedback_score.labels(v.arm, v.version).observe(v.score)


def feedback_routes(router: Router) -> APIRouter:
    api = APIRouter(route_class=guarded(("chat",)))

    @api.post("/v1/feedback", summary="A score (0..1) or thumbs up/down for a response id")
    async def feedback(fb: Feedback, call: CurrentCall) -> dict[str, Any]:
        arm, version, _ = await rated(router, fb.response_id, call, "response_id")
        call.arm, call.version, call.response_id = arm, version, fb.response_id
        await record(router, call, [Vote(fb.response_id, arm, version, fb.value, fb.thumbs, fb.comment)])
        return {"status": "recorded", "response_id": fb.response_id, "arm": arm, "model_version": version}

    return api
