"""Per-key limits on requests and tokens per minute, in one-minute windows.

Requests are counted when admitted; tokens after the answer, from the upstream's own usage figures (prompt and
completion, embeddings too), so a key at its token budget is refused from its next request until the window
ends. The counts live in a backend behind one small protocol: in-process (`Memory`), or shared by several
routers through Redis (`Shared`, when `REDIS_URL` is set).

`Shared` decides from this router's exact counts plus the other routers' counts as of its last exchange with
Redis, so the request path waits on Redis only when a key is new in the window or its view is older than
`stale_s`. Its own increments go to Redis right after each decision, batched (one exchange in flight at a time).
Across routers a key can overshoot by what the others admitted within one exchange (milliseconds). While Redis
is down every router goes on counting its own traffic: the limits still hold per router, never lapse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any, Protocol

WINDOW_S = 60
log = logging.getLogger("fibreflow.serving")


def _window(now: float) -> tuple[int, float]:
    """(window number, seconds until it ends)."""
    return int(now // WINDOW_S), WINDOW_S - now % WINDOW_S


class Counts(Protocol):
    """Counters per "ff:rl:<req|tok>:<key>:<window>"."""

    async def totals(self, keys: list[str]) -> list[int]: ...
    def add(self, key: str, n: int) -> None: ...
    def forget_before(self, window: int) -> None: ...
    async def close(self) -> None: ...


class Memory:
    """This router's counts only."""

    kind = "memory"

    def __init__(self) -> None:
        self.mine: dict[str, int] = defaultdict(int)

    async def totals(self, keys: list[str]) -> list[int]:
        return [self.mine[k] for k in keys]

    def add(self, key: str, n: int) -> None:
        self.mine[key] += n

    def forget_before(self, window: int) -> None:
        keep = (f":{window}", f":{window - 1}")
        for key in [k for k in self.mine if not k.endswith(keep)]:
            del self.mine[key]

    async def close(self) -> None:
        return None


class Shared(Memory):
    """This router's counts plus the other routers' through Redis; this router's alone while Redis is down."""

    kind = "redis"

    def __init__(self, redis_url: str, timeout_s: float, stale_s: float) -> None:
        import redis.asyncio as aioredis

        super().__init__()
        self.timeout_s, self.stale_s = timeout_s, stale_s
        self._redis = aioredis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._others: dict[str, tuple[float, int]] = {}  # key -> (when seen, the other routers' count then)
        self._unsent: dict[str, int] = defaultdict(int)
        self._exchange: asyncio.Task[None] | None = None
        self.errors = 0  # failed exchanges with Redis
        self._failing = False

    async def totals(self, keys: list[str]) -> list[int]:
        if time.monotonic() - min(self._others.get(k, (0.0, 0))[0] for k in keys) > self.stale_s:
            try:
                values = await asyncio.wait_for(self._redis.mget(keys), self.timeout_s)
            except Exception as exc:  # Redis down or slow: decide on this router's counts alone
                self._failed(exc)
            else:
                self._recovered()
                now = time.monotonic()
                for key, value in zip(keys, values, strict=True):
                    self._others[key] = (now, max(0, int(value or 0) - self.mine[key]))
        return [self.mine[k] + self._others.get(k, (0.0, 0))[1] for k in keys]

    def add(self, key: str, n: int) -> None:
        super().add(key, n)
        self._unsent[key] += n
        if self._exchange is None or self._exchange.done():
            self._exchange = asyncio.create_task(self._push())

    async def _push(self) -> None:
        """Send this router's increments (batched while one exchange is in flight); learn the totals back."""
        while self._unsent:
            batch, self._unsent = dict(self._unsent), defaultdict(int)
            mine = {k: self.mine[k] for k in batch}
            pipe = self._redis.pipeline(transaction=False)
            for key, n in batch.items():
                pipe.incrby(key, n).expire(key, 2 * WINDOW_S)
            try:
                totals = (await asyncio.wait_for(pipe.execute(), self.timeout_s))[::2]
            except Exception as exc:  # dropped: the others never learn of these, this router still counts them
                self._failed(exc)
                return
            self._recovered()
            now = time.monotonic()
            for key, total in zip(batch, totals, strict=True):
                self._others[key] = (now, max(0, int(total) - mine[key]))

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        if not self._failing:
            log.warning("limits: Redis failed (%s); each router counts its own traffic until it is back",
                        type(exc).__name__)  # fmt: skip
            self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.warning("limits: Redis is back; the limits are shared again")
            self._failing = False

    def forget_before(self, window: int) -> None:
        super().forget_before(window)
        keep = (f":{window}", f":{window - 1}")
        for key in [k for k in self._others if not k.endswith(keep)]:
            del self._others[key]

    async def close(self) -> None:
        if self._exchange is not None:
            await asyncio.gather(self._exchange, return_exceptions=True)
        await self._redis.aclose()


class Limiter:
    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self._window = -1

    async def admit(self, kid: str, rpm: int | None, tpm: int | None) -> float | None:
        """None when the request may go ahead (and it is counted), else seconds until the key may retry."""
        window, left = _window(time.time())
        if window != self._window:
            self.counts.forget_before(window)
            self._window = window
        req, tok = f"ff:rl:req:{kid}:{window}", f"ff:rl:tok:{kid}:{window}"
        if rpm is None and tpm is None:
            return None
        requests, tokens = await self.counts.totals([req, tok])
        if (tpm is not None and tokens >= tpm) or (rpm is not None and requests >= rpm):
            return left
        self.counts.add(req, 1)
        return None

    def spend(self, kid: str, tokens: int) -> None:
        if tokens > 0:
            self.counts.add(f"ff:rl:tok:{kid}:{_window(time.time())[0]}", tokens)

    async def close(self) -> None:
        await self.counts.close()


def limiter(redis_url: str | None, timeout_s: float, stale_s: float) -> Limiter:
    counts: Any = Shared(redis_url, timeout_s, stale_s) if redis_url else Memory()
    return Limiter(counts)
