"""The router's audit log: one row per request in Postgres (`request_audit`), written in batches off the request
path. Rows wait in memory and are written every `flush_s` seconds or `batch_size` rows by COPY on a worker thread.

No single row can hold up the others: text fields are made safe for Postgres before they queue (no NUL bytes, no
lone surrogates, bounded lengths), and if a batch still fails on its data, it is written row by row and only the
rows Postgres refuses are dropped (counted). While the database is unreachable the rows wait for the next flush
(the oldest dropped past `KEEP`, counted); a clean shutdown writes everything, a killed router loses at most the
last `flush_s` seconds of rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from dataclasses import astuple, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:
    from fibreflow.serving.keys import KeyRecord
    from fibreflow.serving.metrics import Metrics

log = logging.getLogger("fibreflow.serving")
KEEP = 100_000  # rows kept while the database is unreachable; older ones are dropped (and counted)
TEXT_LIMIT = {"prompt": 20_000, "error": 2_000}  # characters; every other text field: 256


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
    response_id: str | None
    routed_arm: str | None  # the arm the split chose (`arm` says "fallback" when the fallback answered instead)
    fallback: str | None  # why the fallback answered
    forced: bool  # a QA key forced the arm (regression runs): not user traffic

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):
                setattr(self, f.name, safe_text(value, TEXT_LIMIT.get(f.name, 256)))


COLUMNS = ", ".join(f.name for f in fields(AuditRow))


def safe_text(value: str, limit: int) -> str:
    """Text Postgres stores: no NUL (COPY refuses it), no lone surrogates (not UTF-8), at most `limit` chars."""
    return value[:limit].replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


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
    forced: bool = False  # a QA key asked for this arm: its answer, or an error, never the fallback's
    response_id: str | None = None
    routed_arm: str | None = None  # the arm the split chose, kept when the fallback answers instead
    finished: bool = False  # its metrics and audit row are done: exactly once

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

    def has_scope(self, scope: str) -> bool:
        return self.key is not None and scope in self.key.scopes

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
            self.response_id,
            self.routed_arm,
            self.fallback,
            self.forced,
        )


class AuditWriter:
    def __init__(self, database_url: str, batch_size: int, flush_s: float, metrics: Metrics) -> None:
        self.url, self.batch_size, self.flush_s, self.metrics = database_url, batch_size, flush_s, metrics
        self._rows: list[AuditRow] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        metrics.audit_pending.set_function(lambda: len(self._rows))

    def add(self, row: AuditRow) -> None:
        self._rows.append(row)
        if len(self._rows) > KEEP:
            over = len(self._rows) - KEEP
            del self._rows[:over]
            self.metrics.audit_rows.labels("dropped_overflow").inc(over)
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
            written, refused = await asyncio.to_thread(self._write, rows)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:  # unreachable: keep them for later
            if not self._failing:
                log.warning("audit: the database is unreachable (%s); rows wait for it", str(exc).strip()[:200])
                self._failing = True
            self._rows[:0] = rows
            return
        if self._failing:
            log.warning("audit: the database is back; %d rows written", written)
            self._failing = False
        self.metrics.audit_rows.labels("written").inc(written)
        if refused:
            self.metrics.audit_rows.labels("dropped_invalid").inc(refused)

    def _write(self, rows: list[AuditRow]) -> tuple[int, int]:
        """(written, refused): the batch by one COPY; if Postgres refuses its data, row by row."""
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            try:
                self._copy(conn, rows)
                return len(rows), 0
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except (psycopg.Error, ValueError) as exc:
                log.warning("audit: a batch of %d rows was refused (%s); writing them one by one", len(rows), exc)
            refused = 0
            for row in rows:
                try:
                    self._copy(conn, [row])
                except (psycopg.OperationalError, psycopg.InterfaceError):
                    raise
                except (psycopg.Error, ValueError) as exc:
                    refused += 1
                    log.warning("audit: row dropped (%s): %s", type(exc).__name__, str(exc).strip()[:200])
            return len(rows) - refused, refused

    @staticmethod
    def _copy(conn: psycopg.Connection, rows: list[AuditRow]) -> None:
        with conn.transaction(), conn.cursor().copy(f"COPY request_audit ({COLUMNS}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(astuple(row))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()
