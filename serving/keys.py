"""API keys: `ffk_<id>.<secret>`, stored as id + SHA-256 of the secret in Postgres, with scopes, expiry,
rotation (the old key lives on for an overlap window) and revocation.

The router checks keys through `KeyCache`: a key's row is read at most once per `cache_s` seconds, so a revoked
or expired key stops working within `cache_s` and the hot path almost never waits on the database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from fibreflow.core.errors import FibreFlowError

PREFIX = "ffk_"
SCOPES = ("chat", "admin")


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
    """Key id -> record, read from Postgres at most once per `cache_s` per key (unknown ids too)."""

    def __init__(self, database_url: str, cache_s: float) -> None:
        self.url, self.cache_s = database_url, cache_s
        self._rows: dict[str, tuple[float, KeyRecord | None]] = {}
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()
        self.reads = 0  # database reads so far (how often the cache missed)

    async def lookup(self, kid: str) -> KeyRecord | None:
        found = self._rows.get(kid)
        if found is not None and found[0] > time.monotonic():
            return found[1]
        async with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=5)
            cur = await self._conn.execute(f"SELECT {COLUMNS} FROM api_keys WHERE id = %s", (kid,))
            row = await cur.fetchone()
        self.reads += 1
        record = _record(row) if row else None
        self._rows[kid] = (time.monotonic() + self.cache_s, record)
        if len(self._rows) > 100_000:  # unknown ids must not grow memory without bound
            self._rows.clear()
        return record

    async def authenticate(self, header: str, scope: str, call: Any) -> KeyRecord:
        """The record of the key in an `Authorization: Bearer` header, or an ApiError (401/403) saying why not.
        `call.key_id` is set as soon as the key is known (the audit row names it even when refused)."""
        from fibreflow.serving.protocol import ApiError

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
        if scope not in record.scopes:
            raise ApiError(403, f"this API key lacks the {scope} scope")
        return record

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
