"""API keys: `ffk_<id>.<secret>`, stored as id + SHA-256 of the secret in Postgres, with scopes, expiry,
rotation (the old key lives on for an overlap window) and revocation.

The router checks keys through `KeyCache`: a key's row is read at most once per `cache_s` seconds, so a revoked
or expired key stops working within `cache_s` and the hot path almost never waits on the database; a database
outage is bridged with the last good records.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import psycopg
from fibreflow.core.errors import FibreFlowError
from fibreflow.serving.config import Auth
from fibreflow.serving.protocol import ApiError
from psycopg_pool import AsyncConnectionPool, PoolTimeout

PREFIX = "ffk_"
SCOPES = ("chat", "admin", "qa", "metrics")  # qa: force an arm, run regressions; metrics: scrape /metrics


class ApiKeyError(FibreFlowError):
    """A key operation that cannot be done as asked (unknown id, bad scope)."""


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    secret_sha256: str
    scopes: tuple[str, ...]
    requests_per_minute: int | None
    tokens_per_minute: int | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    rotated_from: str | None

    def problem(self, now: dt.datetime) -> str | None:
        """Why this key may not be used now (None: it may)."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return "this API key was revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "this API key has expired"
        return None


COLUMNS = (
    "id, name, secret_sha256, scopes, requests_per_minute, tokens_per_minute, expires_at, revoked_at, rotated_from"
)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split(key: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    if not key.startswith(PREFIX) or "." not in key:
        return None
    kid, _, secret = key.partition(".")
    return (kid, secret) if kid and secret else None


def matches(record: KeyRecord, secret: str) -> bool:
    return hmac.compare_digest(record.secret_sha256, _digest(secret))


def _record(row: tuple[Any, ...]) -> KeyRecord:
    return KeyRecord(row[0], row[1], row[2], tuple(row[3]), *row[4:])


def open_keys_db() -> psycopg.Connection:
    """The configured database (DATABASE_URL or the embedded one), checked to be migrated."""
    from fibreflow.core.db import check_schema, open_db

    conn = open_db()
    check_schema(conn)
    return conn


def create(
    conn: psycopg.Connection,
    name: str,
    scopes: list[str],
    *,
    expires_in: dt.timedelta | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    rotated_from: str | None = None,
) -> tuple[str, KeyRecord]:
    """A new key: (the key, shown only now, its record)."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ApiKeyError(f"scopes must be some of {', '.join(SCOPES)} (got {', '.join(scopes) or 'none'})")
    kid, secret = PREFIX + secrets.token_hex(6), secrets.token_urlsafe(32)
    expires = dt.datetime.now(dt.UTC) + expires_in if expires_in else None
    row = conn.execute(
        f"INSERT INTO api_keys (id, name, secret_sha256, scopes, requests_per_minute, tokens_per_minute, expires_at,"
        f" rotated_from) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {COLUMNS}",
        (kid, name, _digest(secret), scopes, requests_per_minute, tokens_per_minute, expires, rotated_from),
    ).fetchone()
    assert row is not None
    return f"{kid}.{secret}", _record(row)


def get(conn: psycopg.Connection, kid: str) -> KeyRecord | None:
    row = conn.execute(f"SELECT {COLUMNS} FROM api_keys WHERE id = %s", (kid,)).fetchone()
    return _record(row) if row else None


def rotate(conn: psycopg.Connection, kid: str, overlap: dt.timedelta) -> tuple[str, KeyRecord]:
    """A new key with the same name, scopes and limits; the old one expires after `overlap` (sooner if it
    already expires sooner). One transaction: both happen or neither."""
    with conn.transaction():
        old = get(conn, kid)
        if old is None:
            raise ApiKeyError(f"no API key {kid!r}")
        if (why := old.problem(dt.datetime.now(dt.UTC))) is not None:
            raise ApiKeyError(f"{kid}: cannot rotate: {why}")
        remaining = old.expires_at - dt.datetime.now(dt.UTC) if old.expires_at else None
        key, new = create(conn, old.name, list(old.scopes), expires_in=remaining,
                          requests_per_minute=old.requests_per_minute, tokens_per_minute=old.tokens_per_minute,
                          rotated_from=kid)  # fmt: skip
        conn.execute(
            "UPDATE api_keys SET expires_at = LEAST(coalesce(expires_at, 'infinity'), now() + %s) WHERE id = %s",
            (overlap, kid),
        )
    return key, new


def revoke(conn: psycopg.Connection, kid: str) -> None:
    row = conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL RETURNING id",
                       (kid,)).fetchone()  # fmt: skip
    if row is None:
        raise ApiKeyError(f"no active API key {kid!r} (unknown or already revoked)")


def listing(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every key without its hash: id, name, scopes, limits, created, expires, revoked, rotated_from."""
    rows = conn.execute(
        "SELECT id, name, scopes, requests_per_minute, tokens_per_minute, created_at, expires_at, revoked_at,"
        " rotated_from FROM api_keys ORDER BY created_at"
    ).fetchall()
    names = ("id", "name", "scopes", "requests_per_minute", "tokens_per_minute", "created_at", "expires_at",
             "revoked_at", "rotated_from")  # fmt: skip
    return [dict(zip(names, r, strict=True)) for r in rows]


class KeyCache:
    """Key id -> record for the router, without a lock and without the database on the hot path.

    A record is re-read at most once per `cache_s` (a revoked key stops within that bound), one read per id at a
    time however many requests wait for it. While the database is unreachable, a record read within `stale_s`
    is still served; without one the answer is 503 (never a 500). Unknown ids are remembered in a bounded LRU of
    their own, so a flood of random keys evicts no real one; ids never seen reach the database at most
    `unknown_lookups_per_s` times a second in all, so that flood cannot load the database either.
    """

    def __init__(self, pool: AsyncConnectionPool, cfg: Auth) -> None:
        self.pool, self.cfg = pool, cfg
        self._known: dict[str, tuple[float, KeyRecord]] = {}  # id -> (read at, record)
        self._unknown: OrderedDict[str, float] = OrderedDict()  # id -> remembered until
        self._reading: dict[str, asyncio.Task[KeyRecord | None]] = {}
        self._budget, self._refilled = float(cfg.unknown_lookups_per_s), time.monotonic()
        self._down_until = 0.0  # after a failed read, do not wait on the database again before this
        self.reads = 0  # database reads so far (how often the cache missed)
        self.stale_served = 0

    async def lookup(self, kid: str) -> KeyRecord | None:
        now = time.monotonic()
        known = self._known.get(kid)
        if known is not None and now - known[0] < self.cfg.cache_s:
            return known[1]
        if known is None and self._unknown.get(kid, 0.0) > now:
            return None
        if known is None and kid not in self._reading and not self._take_budget(now):
            raise ApiError(503, "too many lookups of unknown API keys right now; retry shortly",
                           headers={"Retry-After": "1"})  # fmt: skip
        if now < self._down_until:  # it failed moments ago: do not make this request wait on it again
            return self._stale(known, now, "the database failed moments ago")
        try:
            task = self._reading.get(kid)
            if task is None:
                task = self._reading[kid] = asyncio.ensure_future(self._read(kid))
                task.add_done_callback(lambda _: self._reading.pop(kid, None))
            return await asyncio.shield(task)
        except (psycopg.Error, PoolTimeout) as exc:
            self._down_until = time.monotonic() + 1.0
            return self._stale(known, now, type(exc).__name__)

    def _stale(self, known: tuple[float, KeyRecord] | None, now: float, why: str) -> KeyRecord:
        """The database cannot be read: the last good record while it is recent enough, else a 503."""
        if known is not None and now - known[0] < self.cfg.stale_s:
            self.stale_served += 1
            return known[1]
        raise ApiError(503, f"the API key database is unreachable ({why}); retry shortly", headers={"Retry-After": "2"})

    def _take_budget(self, now: float) -> bool:
        rate = float(self.cfg.unknown_lookups_per_s)
        self._budget = min(rate, self._budget + (now - self._refilled) * rate)
        self._refilled = now
        if self._budget < 1:
            return False
        self._budget -= 1
        return True

    async def _read(self, kid: str) -> KeyRecord | None:
        async with self.pool.connection(timeout=3) as conn:
            cur = await conn.execute(f"SELECT {COLUMNS} FROM api_keys WHERE id = %s", (kid,))
            row = await cur.fetchone()
        self.reads += 1
        now = time.monotonic()
        if row is None:
            self._known.pop(kid, None)
            self._unknown[kid] = now + self.cfg.cache_s
            self._unknown.move_to_end(kid)
            while len(self._unknown) > self.cfg.unknown_cache_size:
                self._unknown.popitem(last=False)
            return None
        record = _record(row)
        self._known[kid] = (now, record)
        self._unknown.pop(kid, None)
        return record

    async def authenticate(self, header: str, scopes: tuple[str, ...], call: Any) -> KeyRecord:
        """The record of the key in an `Authorization: Bearer` header, or an ApiError (401/403/503) saying why not.
        The key must hold one of `scopes` (none given: any valid key). `call.key_id` is set as soon as the key is
        known (the audit row names it even when refused)."""
        if not header.startswith("Bearer "):
            raise ApiError(401, "missing API key: send `Authorization: Bearer ffk_...` (`fibreflow keys create`)")
        parts = split(header[7:].strip())
        if parts is None:
            raise ApiError(401, "malformed API key: expected ffk_<id>.<secret>")
        record = await self.lookup(parts[0])
        if record is None or not matches(record, parts[1]):
            raise ApiError(401, "invalid API key")
        call.key_id = record.id
        if (why := record.problem(dt.datetime.now(dt.UTC))) is not None:
            raise ApiError(401, why)
        if scopes and not set(scopes) & set(record.scopes):
            raise ApiError(403, f"this API key lacks the {' or '.join(scopes)} scope")
        return record

    async def close(self) -> None:
        for task in list(self._reading.values()):
            task.cancel()
