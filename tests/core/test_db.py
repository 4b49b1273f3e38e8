"""Migrations and connection errors against real servers: embedded PG 18 + pgvector and the machine's PG 15."""

import socket

import psycopg
import pytest
from fibreflow.core import db
from fibreflow.core.errors import (
    DatabaseUnreachable,
    FibreFlowError,
    PgvectorMissing,
    SchemaBehind,
    SchemaMissing,
)

pytestmark = pytest.mark.integration


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


@pytest.mark.parametrize("server", ["embedded", "pg15"])
def test_migrate_twice_is_a_noop(server: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url" if server == "embedded" else "pg15_url")
    with db.connect(url) as conn:
        first = db.migrate(conn)
        assert [m.version for m in first] == [m.version for m in db.migrations()]
        tables = _tables(url)
        assert db.migrate(conn) == []
        db.check_schema(conn)
    assert set(db.CORE_TABLES) <= tables
    assert _tables(url) == tables


def test_unmigrated_database_says_which_command_fixes_it(pg_url: str) -> None:
    with db.connect(pg_url) as conn, pytest.raises(SchemaMissing, match="fibreflow db migrate"):
        db.check_schema(conn)


def test_missing_table_is_named(pg_url: str) -> None:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
        conn.execute("DROP TABLE poles CASCADE")
        with pytest.raises(SchemaMissing, match="poles"):
            db.check_schema(conn)


def test_schema_behind_is_reported(pg_url: str) -> None:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
        conn.execute("DELETE FROM schema_migrations WHERE version = %s", (db.latest_version(),))
        with pytest.raises(SchemaBehind, match=r"version \d+, this release needs \d+.*fibreflow db migrate"):
            db.check_schema(conn)


def test_edited_migration_is_refused(pg_url: str) -> None:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
        conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
        with pytest.raises(FibreFlowError, match="edited after it was applied"):
            db.migrate(conn)


def test_unreachable_database_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://app:s3cret@127.0.0.1:{port}/fibreflow"
    monkeypatch.setenv("DATABASE_URL", url)
    with pytest.raises(DatabaseUnreachable) as err:
        db.open_db()
    assert "DATABASE_URL" in str(err.value) and f":{port}" in str(err.value)
    assert "s3cret" not in str(err.value)


def test_pgvector_missing_on_plain_postgres(pg15_url: str) -> None:
    with db.connect(pg15_url) as conn, pytest.raises(PgvectorMissing, match="pgvector"):
        db.ensure_pgvector(conn)


def test_pgvector_present_on_embedded(pg_url: str) -> None:
    with db.connect(pg_url) as conn:
        db.ensure_pgvector(conn)
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()


def test_embedded_server_lifecycle(project_tmp, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = db.load_db_config()
    url = db.embedded_up(cfg)
    try:
        assert str(project_tmp) in url  # data lives under the project
        with db.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0] == cfg.embedded_database
        assert db.embedded_up(cfg) == url  # on demand: a second call reuses the running server
    finally:
        assert db.embedded_down(cfg)
    assert not db.embedded_down(cfg)
    with pytest.raises(DatabaseUnreachable, match="fibreflow db up"):
        db.connect(url, timeout_s=2)


def test_redact_hides_password() -> None:
    assert db.redact("postgresql://u:pw@h:5432/d") == "postgresql://u:***@h:5432/d"
