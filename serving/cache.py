"""Response cache: Redis when `REDIS_URL` is set, in-process otherwise.

Key: the normalised request (messages with whitespace collapsed and case folded, every other parameter except
`user`/`stream`) plus the model version that answers it, so a promotion never serves the old model's answers.
TTL by query pattern (configs/serving.yaml). Sampled answers (temperature > 0) are not cached unless configured.
A Redis that errors or is slower than `redis_timeout_s` counts as a miss: the request is served without cache
and the failure shows in the metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import OrderedDict
from typing import Any, Protocol

import orjson
from fibreflow.serving.config import Cache as CacheConfig
from fibreflow.serving.metrics import Metrics

log = logging.getLogger("fibreflow.serving")

IGNORED = {"user", "stream", "stream_options"}  # do not change the answer


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def _content(msg: dict[str, Any]) -> Any:
    c = msg.get("content")
    return _normal(c) if isinstance(c, str) else c


def last_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user" and isinstance(msg.get("content"), str):
            return msg["content"]
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


class Backend(Protocol):
    async def get_many(self, keys: list[str]) -> list[bytes | None]: ...
    async def set_many(self, items: dict[str, bytes], ttl_s: int) -> None: ...


class Memory:
    """LRU with expiry, bounded to `max_entries`."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self._get(k) for k in keys]

    def _get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    async def set_many(self, items: dict[str, bytes], ttl_s: int) -> None:
        for key, value in items.items():
            self._items[key] = (time.monotonic() + ttl_s, value)
            self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


class Redis:
    def __init__(self, url: str, timeout_s: float) -> None:
        import redis.asyncio as aioredis

        self.timeout_s = timeout_s
        self._r = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """One round trip however many keys (MGET)."""
        return await asyncio.wait_for(self._r.mget(keys), self.timeout_s)

    async def set_many(self, items: dict[str, bytes], ttl_s: int) -> None:
        """One round trip however many items (a pipeline of SET ... EX)."""
        pipe = self._r.pipeline(transaction=False)
        for key, value in items.items():
            pipe.set(key, value, ex=ttl_s)
        await asyncio.wait_for(pipe.execute(), self.timeout_s)

    async def close(self) -> None:
        await self._r.aclose()


class ResponseCache:
    """The router's one cache (answers and embeddings). A backend that fails or is slower than its timeout is a
    miss, never an error: counted per lookup, shown by `cache_backend_up`, logged once per outage."""

    def __init__(self, cfg: CacheConfig, redis_url: str | None, metrics: Metrics) -> None:
        self.cfg, self.metrics = cfg, metrics
        self.backend: Backend = Redis(redis_url, cfg.redis_timeout_s) if redis_url else Memory(cfg.max_entries)
        self.kind = "redis" if redis_url else "memory"
        self._patterns = [(p.name, re.compile(p.regex, re.IGNORECASE), p.ttl_s) for p in cfg.patterns]
        self.up = True
        metrics.cache_up.labels(self.kind).set(1)

    def policy(self, body: dict[str, Any], pattern: str | None = None) -> tuple[str, int]:
        """(pattern name, TTL seconds) for this request; TTL 0 = not cached. `pattern` names it directly."""
        if not self.cfg.enabled or body.get("stream"):
            return "none", 0
        if body.get("temperature", 1.0) > 0 and not self.cfg.cache_sampled:  # a number: the request was validated
            return "sampled", 0
        if pattern is not None:
            return pattern, next((ttl for name, _, ttl in self._patterns if name == pattern), self.cfg.default_ttl_s)
        text = last_user_text(body)
        for name, regex, ttl in self._patterns:
            if regex.search(text):
                return name, ttl
        return "default", self.cfg.default_ttl_s

    @staticmethod
    def key(body: dict[str, Any], version: str) -> str:
        normal = {k: v for k, v in body.items() if k not in IGNORED and k != "messages"}
        if "messages" in body:
            normal["messages"] = [{**m, "content": _content(m)} if isinstance(m, dict) else m for m in body["messages"]]
        if isinstance(normal.get("prompt"), str):
            normal["prompt"] = _normal(normal["prompt"])
        raw = orjson.dumps(normal, option=orjson.OPT_SORT_KEYS)
        return "ff:cache:" + hashlib.sha256(version.encode() + b"\x00" + raw).hexdigest()

    async def get_many(self, keys: list[str], arm: str) -> list[bytes | None]:
        """The cached values (None where there is none), counted per key under `arm`."""
        try:
            found = await self.backend.get_many(keys)
        except Exception as exc:  # Redis down or slow: served without cache, visibly
            self._failed(arm, exc, len(keys))
            return [None] * len(keys)
        hits = sum(v is not None for v in found)
        self.metrics.cache.labels(arm, "hit").inc(hits)
        self.metrics.cache.labels(arm, "miss").inc(len(keys) - hits)
        return found

    async def set_many(self, items: dict[str, bytes], ttl_s: int, arm: str) -> None:
        try:
            await self.backend.set_many(items, ttl_s)
        except Exception as exc:
            self._failed(arm, exc, 1)
            return
        if not self.up:
            log.warning("cache %s answers again", self.kind)
            self.up = True
        self.metrics.cache_up.labels(self.kind).set(1)

    def _failed(self, arm: str, exc: Exception, n: int) -> None:
        self.metrics.cache.labels(arm, "error").inc(n)
        self.metrics.cache_up.labels(self.kind).set(0)
        if self.up:
            log.warning("cache %s failed (%s): serving without it until it answers", self.kind, type(exc).__name__)
            self.up = False

    async def close(self) -> None:
        if isinstance(self.backend, Redis):
            await self.backend.close()
