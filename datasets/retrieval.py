"""Top-k retrieval from pgvector with metadata filters, built from bound parameters only.

A `Retriever` holds no connection: each search takes one (a pooled one in the router), and its session settings
are `SET LOCAL` inside the search's own transaction, so it is safe behind a transaction pooler (Supabase :6543)
and on a connection that was replaced after a database restart.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg
from fibreflow.datasets.embed import check_space
from fibreflow.datasets.embedding import TextEncoder
from pgvector.psycopg import register_vector
from psycopg import sql


@dataclass(frozen=True)
class Filters:
    """Retrieval filters; None means "any". Values travel as bound parameters, never as SQL text."""

    project_id: str | None = None
    region: str | None = None
    record_type: str | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None

    def where(self) -> tuple[sql.Composable, list[Any]]:
        clauses: list[sql.Composable] = []
        params: list[Any] = []
        for column, op, value in (
            ("project_id", "=", self.project_id),
            ("region", "=", self.region),
            ("record_type", "=", self.record_type),
            ("record_date", ">=", self.date_from),
            ("record_date", "<=", self.date_to),
        ):
            if value is not None:
                clauses.append(sql.SQL("{} {} %s").format(sql.Identifier(column), sql.SQL(op)))
                params.append(value)
        if not clauses:
            return sql.SQL(""), params
        return sql.SQL("WHERE ") + sql.SQL(" AND ").join(clauses), params


@dataclass(frozen=True)
class Hit:
    record_id: str
    record_type: str
    project_id: str | None
    content: str
    score: float  # cosine similarity, 1 = identical


class Retriever:
    """Embeds the query with the same model that built the table (checked on first use) and searches HNSW."""

    def __init__(self, embedder: TextEncoder, table: str, ef_search: int = 64) -> None:
        self.embedder, self.table, self.ef_search = embedder, table, ef_search
        self._checked = False

    def search(self, conn: psycopg.Connection, query: str, k: int = 5, filters: Filters | None = None) -> list[Hit]:
        return self.search_vector(conn, self.embedder.encode([query])[0], k, filters)

    def containing(
        self, conn: psycopg.Connection, needle: str, k: int = 5, filters: Filters | None = None
    ) -> list[Hit]:
        """Records whose text contains `needle` (an identifier: a pole number, a BOQ code), within the filters:
        what embeddings of near-identical names cannot tell apart. Score 1.0."""
        where, params = (filters or Filters()).where()
        like = "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        clause = sql.SQL("AND") if params else sql.SQL("WHERE")
        query = sql.SQL("SELECT record_id, record_type, project_id, content FROM {} {} {} content ILIKE %s"
                        " ORDER BY record_id LIMIT %s").format(sql.Identifier(self.table), where, clause)  # fmt: skip
        rows = conn.execute(query, [*params, like, k]).fetchall()
        return [Hit(r[0], r[1], r[2], r[3], 1.0) for r in rows]

    def search_vector(
        self, conn: psycopg.Connection, vector: Any, k: int = 5, filters: Filters | None = None
    ) -> list[Hit]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if conn.adapters.types.get("vector") is None:
            register_vector(conn)
        if not self._checked:
            check_space(conn, self.table, self.embedder.spec)
            self._checked = True
        where, params = (filters or Filters()).where()
        query = sql.SQL(
            "SELECT record_id, record_type, project_id, content, 1 - (embedding <=> %s) AS score"
            " FROM {} {} ORDER BY embedding <=> %s LIMIT %s"
        ).format(sql.Identifier(self.table), where)
        with conn.transaction():
            # Filtered HNSW scans keep searching until k rows pass the filter (pgvector >= 0.8).
            conn.execute("SET LOCAL hnsw.iterative_scan = strict_order")
            conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(self.ef_search)))
            rows = conn.execute(query, [vector, *params, vector, k]).fetchall()
        return [Hit(r[0], r[1], r[2], r[3], float(r[4])) for r in rows]
