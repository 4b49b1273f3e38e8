"""The router's audit log: one row per request in Postgres (`request_audit`), written in batches off the
request path. Rows wait in memory and are flushed every `flush_s` seconds or `batch_size` rows by COPY on a
worker thread; a failed write keeps them for the next flush; a clean shutdown flushes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from dataclasses import astuple, dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:
    from fibreflow.serving.keys import KeyRecord

log = logging.getLogger("fibreflow.serving")
KEEP = 100_000  # rows kept while the database is unreachable; older ones are dropped (and counted)


@dataclass
class AuditRow:
    at: dt.datetime
    key_id: str | None
    caller: str
    endpoint: str
    model: str | None
    arm: str | None
    model_version: str | None
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float
    cache: str | None
    error: str | None
    prompt: str | None


COLUMNS = ", ".join(AuditRow.__dataclass_fields__)


@dataclass
class Call:
    """One request as the router saw it: what metrics, limits and the audit row are made of."""

    started: float
    endpoint: str
    caller: str
    key_id: str | None = None
    key: KeyRecord | None = None
    model: str | None = None
    arm: str | None = None
    version: str | None = None
    status: int = 200
    kind: str | None = None  # error kind for the metrics
    usage: dict[str, Any] = field(default_factory=dict)
    cache: str | None = None
    error: str | None = None
    prompt: str | None = None
    streaming: bool = False
    fallback: str | None = None  # why the fallback answered instead of the arm

    def headers(self) -> dict[str, str]:
        out = {"x-fibreflow-arm": self.arm or "", "x-fibreflow-model-version": self.version or ""}
        if self.cache is not None:
            out["x-fibreflow-cache"] = self.cache
        if self.fallback is not None:
            out["x-fibreflow-fallback"] = self.fallback
        return out

    @property
    def limit_id(self) -> str:
        return self.key_id or f"ip:{self.caller}"

    def row(self, elapsed_s: float) -> AuditRow:
        u = self.usage
        return AuditRow(
            dt.datetime.now(dt.UTC),
            self.key_id,
            self.caller,
            self.endpoint,
            self.model,
            self.arm,
            self.version,
            self.status,
            u.get("prompt_tokens"),
            u.get("completion_tokens"),
            elapsed_s * 1000,
            self.cache,
            self.error,
            self.prompt,
        )


class AuditWriter:
    def __init__(self, database_url: str, batch_size: int, flush_s: float) -> None:
        self.url, self.batch_size, self.flush_s = database_url, batch_size, flush_s
        self._rows: list[AuditRow] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.dropped = 0

    def add(self, row: AuditRow) -> None:
        self._rows.append(row)
        if len(self._rows) > KEEP:
            del self._rows[: len(self._rows) - KEEP]
            self.dropped += 1
        if len(self._rows) >= self.batch_size:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            return
        try:
            await asyncio.to_thread(self._write, rows)
        except psycopg.Error as exc:
            log.warning("audit: %d rows not written (%s); retrying at the next flush", len(rows), exc)
            self._rows[:0] = rows
        else:
            self.written += len(rows)

    def _write(self, rows: list[AuditRow]) -> None:
        with (
            psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn,
            conn.cursor().copy(f"COPY request_audit ({COLUMNS}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(astuple(row))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()
