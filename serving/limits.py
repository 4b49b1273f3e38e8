"""Per-key limits on requests and tokens per minute, in one-minute windows: shared through Redis when
`REDIS_URL` is set (several routers, one budget), in-process otherwise.

Requests are counted when admitted; tokens after the answer (they are known only then), so a key at its token
budget is refused from its next request until the window ends. A failing Redis lets requests through (it is
counted in the metrics): an outage of the limiter must not become an outage of the assistant.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

WINDOW_S = 60


def _window(now: float) -> tuple[int, float]:
    """(window number, seconds until it ends)."""
    return int(now // WINDOW_S), WINDOW_S - now % WINDOW_S


class Limiter:
    def __init__(self, redis_url: str | None, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._redis = None
        if redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._counts: dict[str, int] = defaultdict(int)  # in-process: "<kind>:<key>:<window>" -> count
        self.kind = "redis" if redis_url else "memory"

    async def admit(self, kid: str, rpm: int | None, tpm: int | None) -> float | None:
        """None when the request may go ahead (and it is counted), else seconds until the key may retry."""
        window, left = _window(time.time())
        req, tok = f"ff:rl:req:{kid}:{window}", f"ff:rl:tok:{kid}:{window}"
        if self._redis is None:
            self._forget(window)
            if tpm is not None and self._counts[tok] >= tpm:
                return left
            self._counts[req] += 1
            return left if rpm is not None and self._counts[req] > rpm else None
        pipe = self._redis.pipeline(transaction=False)
        pipe.incr(req).expire(req, 2 * WINDOW_S).get(tok)
        n, _, used = await asyncio.wait_for(pipe.execute(), self.timeout_s)
        if tpm is not None and int(used or 0) >= tpm:
            return left
        return left if rpm is not None and int(n) > rpm else None

    async def spend(self, kid: str, tokens: int) -> None:
        if tokens <= 0:
            return
        window, _ = _window(time.time())
        tok = f"ff:rl:tok:{kid}:{window}"
        if self._redis is None:
            self._counts[tok] += tokens
            return
        pipe = self._redis.pipeline(transaction=False)
        pipe.incrby(tok, tokens).expire(tok, 2 * WINDOW_S)
        await asyncio.wait_for(pipe.execute(), self.timeout_s)

    def _forget(self, window: int) -> None:
        if len(self._counts) > 10_000:  # drop finished windows
            for k in [k for k in self._counts if not k.endswith(f":{window}")]:
                del self._counts[k]

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
