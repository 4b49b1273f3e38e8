"""Per-key limits on requests and tokens per minute, in one-minute windows; shared through Redis when
`REDIS_URL` is set (several routers, one budget), in-process otherwise.

Requests are counted when admitted; tokens after the answer (they are known only then), so a key at its token
budget is refused from its next request until the window ends.

With Redis, a router decides from its own exact counts plus the other routers' counts as of its last exchange
with Redis, so the request path waits on Redis only when a key is new in the window or its view is older than
`stale_s`. Its own increments go to Redis right after each decision, batched (one exchange in flight at a time,
carrying everything counted meanwhile), and each exchange brings back the totals. Across routers a key can
therefore overshoot by the requests other routers admitted within one exchange (milliseconds). A failing Redis
lets requests through (the caller counts it): an outage of the limiter must not become one of the assistant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

WINDOW_S = 60
log = logging.getLogger("fibreflow.serving")


def _window(now: float) -> tuple[int, float]:
    """(window number, seconds until it ends)."""
    return int(now // WINDOW_S), WINDOW_S - now % WINDOW_S


class Limiter:
    def __init__(self, redis_url: str | None, timeout_s: float, stale_s: float = 1.0) -> None:
        self.timeout_s, self.stale_s = timeout_s, stale_s
        self._redis: Any = None
        if redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.kind = "redis" if redis_url else "memory"
        self._mine: dict[str, int] = defaultdict(int)  # "ff:rl:<req|tok>:<key>:<window>" -> this router's count
        self._others: dict[str, tuple[float, int]] = {}  # -> (when seen, the other routers' count then)
        self._unsent: dict[str, int] = defaultdict(int)
        self._exchange: asyncio.Task[None] | None = None
        self._window = -1
        self.sync_errors = 0

    def _count(self, key: str) -> int:
        return self._mine[key] + self._others.get(key, (0.0, 0))[1]

    async def admit(self, kid: str, rpm: int | None, tpm: int | None) -> float | None:
        """None when the request may go ahead (and it is counted), else seconds until the key may retry."""
        window, left = _window(time.time())
        if window != self._window:
            self._roll(window)
        req, tok = f"ff:rl:req:{kid}:{window}", f"ff:rl:tok:{kid}:{window}"
        if self._redis is not None:
            seen = min(self._others.get(req, (0.0, 0))[0], self._others.get(tok, (0.0, 0))[0])
            if time.monotonic() - seen > self.stale_s:
                await self._learn([req, tok])
        if tpm is not None and self._count(tok) >= tpm:
            return left
        if rpm is not None and self._count(req) >= rpm:
            return left
        self._add(req, 1)
        return None

    def spend(self, kid: str, tokens: int) -> None:
        if tokens > 0:
            self._add(f"ff:rl:tok:{kid}:{_window(time.time())[0]}", tokens)

    def _add(self, key: str, n: int) -> None:
        self._mine[key] += n
        if self._redis is not None:
            self._unsent[key] += n
            if self._exchange is None or self._exchange.done():
                self._exchange = asyncio.create_task(self._push())

    async def _learn(self, keys: list[str]) -> None:
        values = await asyncio.wait_for(self._redis.mget(keys), self.timeout_s)
        now = time.monotonic()
        for key, value in zip(keys, values, strict=True):
            self._others[key] = (now, max(0, int(value or 0) - self._mine[key]))

    async def _push(self) -> None:
        """Send this router's increments (batched while one exchange is in flight); learn the totals back."""
        while self._unsent:
            batch, self._unsent = dict(self._unsent), defaultdict(int)
            mine = {k: self._mine[k] for k in batch}
            pipe = self._redis.pipeline(transaction=False)
            for key, n in batch.items():
                pipe.incrby(key, n).expire(key, 2 * WINDOW_S)
            try:
                totals = (await asyncio.wait_for(pipe.execute(), self.timeout_s))[::2]
            except Exception as exc:  # counted and dropped: the limiter fails open
                self.sync_errors += 1
                log.warning("limits: Redis exchange failed (%s); counting locally", type(exc).__name__)
                return
            now = time.monotonic()
            for key, total in zip(batch, totals, strict=True):
                self._others[key] = (now, max(0, int(total) - mine[key]))

    def _roll(self, window: int) -> None:
        """A new minute: forget windows before the previous one."""
        keep = (f":{window}", f":{window - 1}")
        for table in (self._mine, self._others):
            for key in [k for k in table if not k.endswith(keep)]:
                del table[key]
        self._window = window

    async def close(self) -> None:
        if self._exchange is not None:
            await asyncio.gather(self._exchange, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()
