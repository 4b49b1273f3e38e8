"""Embeddings in pgvector: incremental by record hash, the vector-space guard, filtered retrieval."""

import datetime as dt
from pathlib import Path

import pytest
from fibreflow.core import db
from fibreflow.core.errors import EmbeddingSpaceMismatch, PgvectorMissing
from fibreflow.datasets.embed import embed, load_embed_config
from fibreflow.datasets.embedding import Embedder
from fibreflow.datasets.retrieval import Filters, Retriever

pytestmark = pytest.mark.integration
CFG = load_embed_config()


def _count(url: str, sql: str = "SELECT count(*) FROM record_embeddings") -> int:
    with db.connect(url) as conn:
        return conn.execute(sql).fetchone()[0]


def test_first_load_embeds_everything_with_an_index(embedded_url: str) -> None:
    corpus = _count(embedded_url, "SELECT count(*) FROM fibreflow_corpus")
    assert _count(embedded_url) == corpus > 1000
    with db.connect(embedded_url) as conn:
        idx = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'record_embeddings_hnsw'").fetchone()
        spec = conn.execute("SELECT model_name, dim FROM embedding_indexes").fetchone()
    assert idx and "hnsw" in idx[0]
    assert spec == ("sentence-transformers/all-MiniLM-L6-v2", 384)


def test_incremental_embeds_only_changed_and_new_records(embedded_url: str, embedder: Embedder) -> None:
    assert embed(CFG, embedded_url, embedder, progress=False)["embedded"] == 0
    with db.connect(embedded_url) as conn:
        conn.execute("UPDATE tasks SET status = 'blocked' WHERE id = (SELECT min(id) FROM tasks)")
        conn.execute("INSERT INTO glossary VALUES ('Splice bay', 'equipment', 'A bay in the POP for splicing.', '{}')")
        conn.execute("DELETE FROM poles WHERE id = (SELECT max(id) FROM poles)")
        before = conn.execute(
            "SELECT embedding::text FROM record_embeddings WHERE record_type = 'boq_item' ORDER BY record_id LIMIT 1"
        ).fetchone()[0]
    # one task and the project rendering (its pole counts changed) are re-embedded, plus one new term
    result = embed(CFG, embedded_url, embedder, progress=False)
    assert (result["embedded"], result["deleted"]) == (3, 1)
    assert _count(embedded_url) == _count(embedded_url, "SELECT count(*) FROM fibreflow_corpus")
    with db.connect(embedded_url) as conn:
        after = conn.execute(
            "SELECT embedding::text FROM record_embeddings WHERE record_type = 'boq_item' ORDER BY record_id LIMIT 1"
        ).fetchone()[0]
        content = conn.execute("SELECT content FROM record_embeddings WHERE record_id = 'glossary:Splice bay'")
        assert "splicing" in content.fetchone()[0]
    assert after == before


def test_interrupted_run_resumes(embedded_url: str, embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    with db.connect(embedded_url) as conn:
        conn.execute("TRUNCATE record_embeddings")
    import fibreflow.datasets.embed as embed_mod

    original, calls = embed_mod._write_chunk, {"n": 0}

    def dies_on_third_chunk(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(*args)

    monkeypatch.setattr(embed_mod, "_write_chunk", dies_on_third_chunk)
    small = CFG.model_copy(update={"chunk_rows": 200})
    with pytest.raises(KeyboardInterrupt):
        embed(small, embedded_url, embedder, progress=False)
    assert _count(embedded_url) == 400  # two whole chunks kept, nothing half-written
    monkeypatch.setattr(embed_mod, "_write_chunk", original)
    result = embed(small, embedded_url, embedder, progress=False)
    assert result["embedded"] == _count(embedded_url, "SELECT count(*) FROM fibreflow_corpus") - 400


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Embedder:
    """A different vector space: the bundled model plus a 16-d projection, built in code."""
    from fibreflow.datasets.embedding import bundled_model_path
    from sentence_transformers import SentenceTransformer, models

    st = SentenceTransformer(str(bundled_model_path()), device="cpu")
    st.append(models.Dense(384, 16))
    path = tmp_path_factory.mktemp("models") / "tiny-16d"
    st.save(str(path))
    return Embedder(str(path))


def test_writing_with_another_model_is_refused(embedded_url: str, other_model: Embedder) -> None:
    assert other_model.spec.dim == 16
    n = _count(embedded_url)
    with pytest.raises(EmbeddingSpaceMismatch, match=r"384-d.*16-d.*--set table="):
        embed(CFG, embedded_url, other_model, progress=False)
    assert _count(embedded_url) == n


def test_querying_with_another_model_is_refused(embedded_url: str, other_model: Embedder) -> None:
    with db.connect(embedded_url) as conn, pytest.raises(EmbeddingSpaceMismatch):
        Retriever(other_model, CFG.table).search(conn, "poles")


def test_another_model_into_its_own_table_or_rebuild(embedded_url: str, other_model: Embedder) -> None:
    own = CFG.model_copy(update={"table": "record_embeddings_tiny"})
    assert embed(own, embedded_url, other_model, progress=False)["dim"] == 16
    rebuilt = embed(CFG.model_copy(update={"rebuild": True}), embedded_url, other_model, progress=False)
    assert rebuilt["dim"] == 16 and rebuilt["bulk_load"]


def test_retrieval_finds_the_right_record(embedded_url: str, embedder: Embedder) -> None:
    with db.connect(embedded_url) as conn:
        hits = Retriever(embedder, CFG.table).search(conn, "What is an optical time-domain reflectometer?", k=3)
    assert hits[0].record_id == "glossary:OTDR"
    assert hits[0].score > hits[-1].score - 1e-6


def test_bf16_vectors_are_unit_length_and_rank_like_float32(embedded_url: str, embedder: Embedder) -> None:
    """`dtype: auto` embeds in bfloat16 where it is native (twice float32's speed here): the vectors are unit length
    in float32, within a cosine of 0.99 of float32's, and a search finds the same records."""
    import numpy as np
    from fibreflow.core.config import torch_dtype

    exact = Embedder("bundled", dtype="float32")
    texts = ["pole 0001-P0007 planted", "What is an optical time-domain reflectometer?", "BOQ for trenching"]
    a, b = exact.encode(texts), Embedder("bundled", dtype="bfloat16").encode(texts)
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(1).min() > 0.99 and not np.array_equal(a, b)
    assert next(embedder._model.parameters()).dtype == torch_dtype("auto")
    with db.connect(embedded_url) as conn:
        hits = [[h.record_id for h in Retriever(e, CFG.table).search(conn, texts[1], k=3)] for e in (exact, embedder)]
    assert hits[0][0] == hits[1][0] == "glossary:OTDR"


def test_retrieval_filters(embedded_url: str, embedder: Embedder) -> None:
    with db.connect(embedded_url) as conn:
        r = Retriever(embedder, CFG.table)
        project = conn.execute("SELECT id, region FROM projects LIMIT 1").fetchone()
        only = Filters(project_id=project[0], record_type="daily_progress")
        hits = r.search(conn, "trenching progress", k=8, filters=only)
        assert len(hits) == 8 and all(h.project_id == project[0] and h.record_type == "daily_progress" for h in hits)
        d0, d1 = dt.date(2026, 1, 1), dt.date(2026, 3, 31)
        dated = r.search(conn, "progress", k=5, filters=Filters(record_type="daily_progress", date_from=d0, date_to=d1))
        ids = [h.record_id for h in dated]
        dates = conn.execute("SELECT record_date FROM record_embeddings WHERE record_id = ANY(%s)", (ids,)).fetchall()
        assert dates and all(d0 <= d[0] <= d1 for d in dates)
        assert r.search(conn, "anything", k=3, filters=Filters(region="Atlantis")) == []


def test_filter_values_carrying_sql_are_just_values(embedded_url: str, embedder: Embedder) -> None:
    n = _count(embedded_url)
    with db.connect(embedded_url) as conn:
        r = Retriever(embedder, CFG.table)
        for evil in ("x'; DROP TABLE record_embeddings; --", "' OR '1'='1", "PRJ-0001' OR 1=1 --"):
            assert r.search(conn, "poles", k=5, filters=Filters(project_id=evil)) == []
            assert r.search(conn, "poles", k=5, filters=Filters(region=evil, record_type=evil)) == []
    assert _count(embedded_url) == n


def test_embed_on_postgres_without_pgvector_is_a_clear_error(pg15_url: str, embedder: Embedder) -> None:
    with db.connect(pg15_url) as conn:
        db.migrate(conn)
    with pytest.raises(PgvectorMissing, match="Extensions"):
        embed(CFG, pg15_url, embedder, progress=False)


def test_unknown_model_path_is_a_config_error(tmp_path: Path) -> None:
    from fibreflow.core.errors import ConfigError

    with pytest.raises(ConfigError, match="not 'bundled' or a local model folder"):
        Embedder(str(tmp_path / "nope"))
