"""`fibreflow embed`: rendered records -> embedding model -> pgvector, incrementally.

Only records whose text hash changed (or that are new) are embedded; records gone from the source are deleted.
Each chunk is COPYed into a staging table and upserted in its own transaction, so an interrupted run keeps
what it finished and the next run resumes. On a first (bulk) load the HNSW index is built after the data.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import psycopg
from fibreflow.core.config import Strict, load_config
from fibreflow.core.db import check_schema, connect, database_url, ensure_pgvector, load_db_config
from fibreflow.core.errors import EmbeddingSpaceMismatch
from fibreflow.datasets.embedding import Embedder, EmbeddingSpec
from pgvector.psycopg import register_vector
from psycopg import sql
from pydantic import field_validator
from tqdm import tqdm

COLUMNS = ("record_id", "record_type", "project_id", "region", "record_date", "content", "content_hash")


class EmbedConfig(Strict):
    model: str
    table: str
    batch_size: int
    dtype: str  # "auto": bfloat16 where this machine computes it natively (2x float32 here), else float32
    chunk_rows: int
    hnsw_m: int
    hnsw_ef_construction: int
    ef_search: int
    rebuild: bool

    @field_validator("table")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", v):
            raise ValueError(f"{v!r} is not a plain lower-case SQL identifier")
        return v


def load_embed_config(overrides: dict[str, Any] | None = None) -> EmbedConfig:
    return load_config(EmbedConfig, "embed", overrides)


def embedder_for(cfg: EmbedConfig) -> Embedder:
    """The embedding model embed.yaml names, as records were embedded with it (batch size, dtype)."""
    return Embedder(cfg.model, cfg.batch_size, cfg.dtype)


def recorded_spec(conn: psycopg.Connection, table: str) -> EmbeddingSpec | None:
    row = conn.execute(
        "SELECT model_name, model_revision, dim FROM embedding_indexes WHERE table_name = %s", (table,)
    ).fetchone()
    return EmbeddingSpec(*row) if row else None


def check_space(conn: psycopg.Connection, table: str, spec: EmbeddingSpec) -> None:
    """Refuse to mix vector spaces: the table's recorded model must be `spec`."""
    have = recorded_spec(conn, table)
    if have is None:
        raise EmbeddingSpaceMismatch(f"table {table} holds no embeddings yet: run `fibreflow embed`")
    if have != spec:
        raise EmbeddingSpaceMismatch(
            f"table {table} holds {have.dim}-d vectors from {have.name} ({have.revision}), but the model in use is "
            f"{spec.name} ({spec.revision}, {spec.dim}-d); use the same model, embed into another table "
            f"(--set table=...), or re-embed everything with --set rebuild=true"
        )


def ensure_table(conn: psycopg.Connection, cfg: EmbedConfig, spec: EmbeddingSpec) -> None:
    """Create the vector table for `spec` (recording its model) or check that it already holds `spec`."""
    t = sql.Identifier(cfg.table)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('fibreflow_embed:' || %s))", (cfg.table,))
        if cfg.rebuild:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))
            conn.execute("DELETE FROM embedding_indexes WHERE table_name = %s", (cfg.table,))
        if recorded_spec(conn, cfg.table) is None:
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (record_id text PRIMARY KEY, record_type text NOT NULL,"
                    " project_id text, region text, record_date date, content text NOT NULL,"
                    " content_hash text NOT NULL, embedding vector({}) NOT NULL)"
                ).format(t, sql.Literal(spec.dim))
            )
            conn.execute(
                "INSERT INTO embedding_indexes (table_name, model_name, model_revision, dim) VALUES (%s, %s, %s, %s)",
                (cfg.table, spec.name, spec.revision, spec.dim),
            )
    check_space(conn, cfg.table, spec)


def _changed_sql(table: str) -> sql.Composed:
    return sql.SQL(
        "SELECT c.record_id, c.record_type, c.project_id, c.region, c.record_date, c.content,"
        " md5(c.content) AS content_hash FROM fibreflow_corpus c LEFT JOIN {} e ON e.record_id = c.record_id"
        " WHERE e.content_hash IS DISTINCT FROM md5(c.content) ORDER BY c.record_id"
    ).format(sql.Identifier(table))


def _write_chunk(conn: psycopg.Connection, table: str, rows: list[tuple], vectors: Any) -> None:
    staging = sql.Identifier(f"_embed_stage_{uuid.uuid4().hex[:8]}")
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(staging, sql.Identifier(table)))
        with cur.copy(
            sql.SQL("COPY {} ({}, embedding) FROM STDIN WITH (FORMAT BINARY)").format(
                staging, sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
            )
        ) as copy:
            copy.set_types(["text", "text", "text", "text", "date", "text", "text", "vector"])
            for row, vec in zip(rows, vectors, strict=True):
                copy.write_row((*row, vec))
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in (*COLUMNS[1:], "embedding")
        )
        cur.execute(
            sql.SQL("INSERT INTO {} SELECT * FROM {} ON CONFLICT (record_id) DO UPDATE SET {}").format(
                sql.Identifier(table), staging, updates
            )
        )


def embed(cfg: EmbedConfig, url: str, embedder: Embedder, *, progress: bool = True) -> dict[str, Any]:
    """Bring `cfg.table` up to date with `fibreflow_corpus`; returns counts and timings."""
    t0 = time.perf_counter()
    with connect(url) as writer, connect(url) as reader:
        check_schema(writer)
        ensure_pgvector(writer)
        register_vector(writer)
        ensure_table(writer, cfg, embedder.spec)
        table, index = sql.Identifier(cfg.table), sql.Identifier(f"{cfg.table}_hnsw")
        bulk = writer.execute(sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(table)).fetchone()[0]
        if bulk:  # building HNSW once after COPY is ~8x faster than COPY into an indexed table
            with writer.transaction():
                writer.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(index))
        todo = reader.execute(sql.SQL("SELECT count(*) FROM ({}) c").format(_changed_sql(cfg.table))).fetchone()[0]
        encode_s, done = 0.0, 0
        with (
            reader.transaction(),
            reader.cursor(name="ff_embed_changed") as cur,
            tqdm(total=todo, desc="embed", unit="rec", disable=not progress) as bar,
        ):
            cur.itersize = cfg.chunk_rows
            cur.execute(_changed_sql(cfg.table))
            while rows := cur.fetchmany(cfg.chunk_rows):
                t = time.perf_counter()
                vectors = embedder.encode([r[5] for r in rows])
                encode_s += time.perf_counter() - t
                _write_chunk(writer, cfg.table, rows, vectors)
                done += len(rows)
                bar.update(len(rows))
        with writer.transaction():
            deleted = writer.execute(
                sql.SQL(
                    "DELETE FROM {} e WHERE NOT EXISTS"
                    " (SELECT 1 FROM fibreflow_corpus c WHERE c.record_id = e.record_id)"
                ).format(table)
            ).rowcount
        t = time.perf_counter()
        with writer.transaction():
            writer.execute(
                sql.SQL(
                    "CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding vector_cosine_ops)"
                    " WITH (m = {}, ef_construction = {})"
                ).format(index, table, sql.Literal(cfg.hnsw_m), sql.Literal(cfg.hnsw_ef_construction))
            )
        index_s = time.perf_counter() - t
        total = writer.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()[0]
    return {
        "table": cfg.table,
        "model": embedder.spec.name,
        "revision": embedder.spec.revision,
        "dim": embedder.spec.dim,
        "embedded": done,
        "deleted": deleted,
        "total": total,
        "bulk_load": bulk,
        "encode_s": round(encode_s, 3),
        "index_s": round(index_s, 3),
        "wall_s": round(time.perf_counter() - t0, 3),
    }


def main(overrides: dict[str, Any] | None = None, *, progress: bool = True) -> dict[str, Any]:
    cfg = load_embed_config(overrides)
    return embed(cfg, database_url(load_db_config()), embedder_for(cfg), progress=progress)
