"""Shadow mode: the shadow arm gets a copy of a request off the request path; its answer is scored against the
answer that was returned (token-set similarity, 0..1) and logged to `var/serving/shadow.jsonl`, never returned.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
from fibreflow.serving.config import Experiment
from fibreflow.serving.upstream import UpstreamUnavailable

if TYPE_CHECKING:
    from fibreflow.serving.router import Router


def answer_text(body: bytes | None) -> str | None:
    """The text of a non-streamed OpenAI answer (chat or completion), None if it has none."""
    try:
        choice = orjson.loads(body or b"")["choices"][0]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    return choice["message"]["content"] if "message" in choice else choice.get("text")


async def shadow(router: Router, exp: Experiment, body: dict[str, Any], path: str, returned: bytes | None) -> None:
    from rapidfuzz import fuzz

    assert exp.shadow is not None
    arm, metrics = exp.shadow, router.metrics
    target = router.targets.of(exp.model).get(arm)
    if target is None:
        metrics.shadow.labels(arm, "no_target").inc()
        return
    payload = orjson.dumps({**body, "model": target.model, "stream": False})
    try:
        answer = await router.upstreams.post(target.upstream, path, payload)
    except UpstreamUnavailable as exc:
        metrics.shadow.labels(arm, exc.kind.split(":")[0]).inc()
        return
    shadow_text, main_text = answer_text(answer.body), answer_text(returned) if returned else None
    record: dict[str, Any] = {
        "ts": time.time(),
        "model": exp.model,
        "arm": arm,
        "version": target.version or target.model,  # as the audit log names it
        "status": answer.status,
        "answer": shadow_text,
        "returned": main_text,
    }
    if shadow_text is not None and main_text is not None:
        record["similarity"] = fuzz.token_set_ratio(shadow_text, main_text) / 100
        metrics.shadow_similarity.labels(arm).observe(record["similarity"])
    metrics.shadow.labels(arm, "ok" if answer.status == 200 else f"http_{answer.status}").inc()
    router.shadow_log.parent.mkdir(parents=True, exist_ok=True)
    with router.shadow_log.open("ab") as f:
        f.write(orjson.dumps(record) + b"\n")
