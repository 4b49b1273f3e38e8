"""`fibreflow data build`: stream the database into versioned datasets.

One REPEATABLE READ snapshot; rows come through server-side cursors and leave in Parquet batches, so memory is
flat in the number of rows. Output goes to a staging folder that is renamed into place only when complete:
an interrupted build leaves nothing behind. The version is a hash of the content and the build config.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from fibreflow.core.config import atomic_write, resolve_path
from fibreflow.core.db import check_schema, open_db, redact, schema_version, table_counts
from fibreflow.core.errors import DatasetBuildError, first_line
from fibreflow.datasets import assistant as asst
from fibreflow.datasets import grounded_qa as qa
from fibreflow.datasets import terminology as term
from fibreflow.datasets.config import DataConfig, load_data_config
from fibreflow.datasets.manifest import FILE as MANIFEST
from fibreflow.datasets.manifest import (
    DatabaseSnapshot,
    DatasetManifest,
    SplitFile,
    read_manifest,
    write_manifest,
)
from fibreflow.datasets.tools import schemas
from psycopg.rows import dict_row
from tqdm import tqdm

TERM_SPLITS = ("train", "validation", "test")
QA_SPLITS = ("train", "test")
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
CALL = pa.struct([("id", pa.string()), ("type", pa.string()),
                  ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])  # fmt: skip
TOOL_MESSAGES = pa.list_(
    pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(CALL)),
               ("tool_call_id", pa.string()), ("weight", pa.int8())])
)  # fmt: skip
SCHEMAS = {
    "terminology": pa.schema(
        [
            ("id", pa.string()),
            ("term", pa.string()),
            ("category", pa.string()),
            ("known", pa.bool_()),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("messages", MESSAGES),
        ]
    ),
    "grounded_qa": pa.schema(
        [
            ("id", pa.string()),
            ("family", pa.string()),
            ("project_id", pa.string()),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("reference", pa.string()),
            ("kind", pa.string()),
            ("contexts", pa.list_(pa.string())),
            ("unit", pa.string()),
            ("tolerance", pa.struct([("abs", pa.float64()), ("rel", pa.float64())])),
            ("messages", MESSAGES),
        ]
    ),
    "assistant": pa.schema(
        [
            ("id", pa.string()),
            ("family", pa.string()),
            ("project_id", pa.string()),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("tools", pa.bool_()),  # offered FibreFlow's tool schemas (datasets/tools.py)
            ("messages", TOOL_MESSAGES),
        ]
    ),
}
GLOSSARY_SQL = "SELECT term, category, definition, aliases FROM glossary ORDER BY term"
PROJECTS_SQL = "SELECT id FROM projects ORDER BY id"
TEST_SET = "accuracy_test.jsonl"


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()


class SplitWriter:
    """Parquet in batches of `batch_rows`, plus a running sha256 of the canonical rows (the content hash)."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.schema, self.batch_rows = path, schema, batch_rows
        self._writer = pq.ParquetWriter(path, schema)
        self._buffer: list[dict[str, Any]] = []
        self._hash = sha256()
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        self._hash.update(canonical(row) + b"\n")
        self._buffer.append(row)
        self.rows += 1
        if len(self._buffer) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self._buffer = []

    def close(self) -> SplitFile:
        self._flush()
        self._writer.close()
        return SplitFile(file=self.path.name, rows=self.rows, sha256=self._hash.hexdigest())


def stream(conn: psycopg.Connection, sql: str, params: dict[str, Any] | None, cursor_rows: int) -> Iterator[dict]:
    """Rows of `sql` through a server-side cursor: `cursor_rows` at a time in memory."""
    with conn.cursor(name=f"ff_{uuid.uuid4().hex[:12]}", row_factory=dict_row) as cur:
        cur.itersize = cursor_rows
        cur.execute(sql, params)
        yield from cur


def _snapshot_info(conn: psycopg.Connection) -> DatabaseSnapshot:
    meta = conn.execute("SELECT value FROM fibreflow_meta WHERE key = 'data_source'").fetchone()
    return DatabaseSnapshot(
        url=redact(conn.info.dsn),
        server_version=conn.execute("SHOW server_version").fetchone()[0],
        schema_version=schema_version(conn),
        snapshot=conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0],
        table_rows=table_counts(conn),
        data_source=meta[0] if meta else None,
    )


def _build_terminology(
    conn: psycopg.Connection, cfg: DataConfig, out: Path, test_jsonl: Any, progress: bool
) -> dict[str, SplitFile]:
    # Pass 1: how many definitions use each word, so a test row's keywords are its definition's rarest words.
    df: dict[str, int] = {}
    for row in stream(conn, GLOSSARY_SQL, None, cfg.cursor_rows):
        for w in term.tokens(row["definition"]):
            df[w] = df.get(w, 0) + 1
    if not df:
        raise DatasetBuildError("the glossary table is empty: run `fibreflow db seed` (demo) or load the glossary")
    writers = {
        s: SplitWriter(out / "terminology" / f"{s}.parquet", SCHEMAS["terminology"], cfg.cursor_rows)
        for s in TERM_SPLITS
    }
    rows = stream(conn, GLOSSARY_SQL, None, cfg.cursor_rows)
    for i, row in enumerate(tqdm(rows, desc="terminology", unit="term", disable=not progress, leave=False)):
        for split in TERM_SPLITS:
            for ex in term.term_examples(cfg.terminology, cfg.system_prompt, i, row, split):
                writers[split].write(ex)
                if split == "test":
                    write_test_row(
                        test_jsonl,
                        {
                            "id": ex["id"],
                            "question": ex["question"],
                            "reference": row["definition"],
                            "kind": "open",
                            "contexts": [],
                            "tags": ["terminology", row["category"]],
                            "keywords": term.keywords(row["definition"], df),
                        },
                    )
    for split in TERM_SPLITS:
        for ex in term.unknown_examples(cfg.terminology, cfg.system_prompt, split):
            writers[split].write(ex)
            if split == "test":
                write_test_row(
                    test_jsonl,
                    {
                        "id": ex["id"],
                        "question": ex["question"],
                        "reference": ex["answer"],
                        "kind": "open",
                        "contexts": [],
                        "tags": ["terminology", "unknown_term"],
                    },
                )
    return {s: w.close() for s, w in writers.items()}


def _build_grounded_qa(
    conn: psycopg.Connection, cfg: DataConfig, out: Path, test_jsonl: Any, progress: bool
) -> tuple[dict[str, SplitFile], list[str]]:
    project_ids = [r["id"] for r in stream(conn, PROJECTS_SQL, None, cfg.cursor_rows)]
    if not project_ids:
        raise DatasetBuildError("the projects table is empty: run `fibreflow db seed` (demo) or sync from Supabase")
    held_out = qa.test_projects(project_ids, cfg.grounded_qa)
    writers = {
        s: SplitWriter(out / "grounded_qa" / f"{s}.parquet", SCHEMAS["grounded_qa"], cfg.cursor_rows) for s in QA_SPLITS
    }
    params = qa.params(cfg.grounded_qa)
    for family in qa.FAMILIES:
        rows = stream(conn, family.sql, params, cfg.cursor_rows)
        for row in tqdm(rows, desc=f"grounded_qa {family.name}", unit="row", disable=not progress, leave=False):
            ex = family.to_example(row)
            ex["messages"] = qa.rag_messages(cfg.system_prompt, ex["question"], ex["contexts"], ex["answer"])
            split = "test" if ex["project_id"] in held_out else "train"
            writers[split].write(ex)
            if split == "test":
                test_row = {k: ex[k] for k in ("id", "question", "reference", "kind", "contexts", "unit", "tolerance")}
                test_row["filters"] = {"project_id": ex["project_id"]}
                test_row["tags"] = ["grounded_qa", family.name, ex["project_id"]]
                write_test_row(test_jsonl, test_row)
    return {s: w.close() for s, w in writers.items()}, sorted(held_out)


def _build_assistant(
    conn: psycopg.Connection, cfg: DataConfig, out: Path, test_jsonl: Any, progress: bool, held_out: set[str]
) -> dict[str, SplitFile]:
    writers = {
        s: SplitWriter(out / "assistant" / f"{s}.parquet", SCHEMAS["assistant"], cfg.cursor_rows) for s in QA_SPLITS
    }
    a, t = cfg.assistant, cfg.terminology
    projects = list(stream(conn, "SELECT id, name FROM projects ORDER BY id", None, cfg.cursor_rows))
    nth: Counter[str] = Counter()  # projects so far per split
    for p in tqdm(projects, desc="assistant", unit="project", disable=not progress, leave=False):
        split = "test" if p["id"] in held_out else "train"
        nth[split] += 1
        for row, tests in asst.grounded(conn, a, cfg.system_prompt, p, split, split == "train", nth[split] - 1):
            writers[split].write(row)
            for test in tests if split == "test" else []:
                write_test_row(test_jsonl, test)
    glossary = list(stream(conn, GLOSSARY_SQL, None, cfg.cursor_rows))
    u = t.unknown_terms
    known = {g["term"].lower() for g in glossary} | {x.lower() for x in (*u.train, *u.validation, *u.test)}
    templates = {"train": t.train_templates, "test": t.test_templates}
    for split, row, test in asst.refusals(conn, a, t.refusal_answer, cfg.system_prompt, known, templates, held_out):
        writers[split].write(row)
        if split == "test":
            write_test_row(test_jsonl, test)
    for i, g in enumerate(sorted(glossary, key=lambda g: asst.salted("glossary", g["term"]))[: a.glossary_with_tools]):
        question = t.train_templates[i % len(t.train_templates)].format(term=g["term"])
        answer = term.answer_for(t, g)
        messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": question},
                    {"role": "assistant", "content": answer}]  # fmt: skip
        row = {"id": f"glossary-tools-{i:03d}", "family": "glossary", "project_id": None, "question": question,
               "answer": answer, "tools": True, "messages": messages}  # fmt: skip
        writers["train"].write(row)
    return {s: w.close() for s, w in writers.items()}


def write_test_row(fh: Any, row: dict[str, Any]) -> None:
    fh.write(json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n")


def build(conn: psycopg.Connection, cfg: DataConfig, *, progress: bool = True) -> Path:
    """Build all datasets from one snapshot; return the version's folder. Same DB state + config -> same version."""
    check_schema(conn)
    root = resolve_path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction(), open(staging / TEST_SET, "w", encoding="utf-8") as test_jsonl:
            db_info = _snapshot_info(conn)
            terminology = _build_terminology(conn, cfg, staging, test_jsonl, progress)
            grounded, test_projects = _build_grounded_qa(conn, cfg, staging, test_jsonl, progress)
            assistant = _build_assistant(conn, cfg, staging, test_jsonl, progress, set(test_projects))
        splits = {"terminology": terminology, "grounded_qa": grounded, "assistant": assistant}
        version = sha256(
            canonical(
                {
                    "config": cfg.content_config(),
                    "tools": schemas(),  # how tool conversations are rendered
                    "splits": {name: {s: v.sha256 for s, v in parts.items()} for name, parts in splits.items()},
                }
            )
        ).hexdigest()[:16]
        manifest = DatasetManifest(
            version=version,
            datasets=splits,
            accuracy_test_set=SplitFile(
                file=TEST_SET,
                rows=_count_lines(staging / TEST_SET),
                sha256=sha256((staging / TEST_SET).read_bytes()).hexdigest(),
            ),
            grounded_qa_test_projects=test_projects,
            build_config=cfg.content_config(),
            source_queries={
                "glossary": GLOSSARY_SQL,
                "projects": PROJECTS_SQL,
                **{f.name: " ".join(f.sql.split()) for f in qa.FAMILIES},
            },
            database=db_info,
        )
        write_manifest(staging, manifest)
        final = root / version
        if not final.exists():
            os.rename(staging, final)  # atomic: the version folder appears complete or not at all
        atomic_write(root / "LATEST", version + "\n")
        return final
    except psycopg.Error as exc:
        raise DatasetBuildError(
            f"database error during the dataset build ({first_line(exc)}); nothing was written"
        ) from exc
    finally:
        if not conn.closed:
            conn.read_only, conn.isolation_level = False, None
        shutil.rmtree(staging, ignore_errors=True)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def version_dir(cfg: DataConfig, version: str | None = None) -> Path:
    """The folder of a built version (default: the latest build)."""
    root = resolve_path(cfg.output_dir)
    if version is None:
        latest = root / "LATEST"
        if not latest.is_file():
            raise DatasetBuildError(f"no datasets built under {root}: run `fibreflow data build`")
        version = latest.read_text().strip()
    path = root / version
    if not (path / MANIFEST).is_file():
        raise DatasetBuildError(f"dataset version {version} not found under {root}")
    return path


def load_datasets(path: Path) -> dict[str, Any]:
    """`{"terminology": DatasetDict, "grounded_qa": DatasetDict}` of a built version (Parquet, memory-mapped)."""
    from datasets import load_dataset

    return {
        name: load_dataset("parquet", data_files={s: str(path / name / v.file) for s, v in parts.items()})
        for name, parts in read_manifest(path).datasets.items()
    }


def log_to_mlflow(path: Path) -> None:
    """Under an active MLflow run, or the run `mlflow run` made for this command (MLFLOW_RUN_ID): every split as
    a run input (`mlflow.data`), the manifest as an artifact, the version as a tag."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if "mlflow" not in sys.modules and not run_id:
        return
    import mlflow

    if mlflow.active_run() is not None:
        _log(path)
    elif run_id:
        from fibreflow.core.tracking import setup_mlflow

        setup_mlflow("fibreflow-data")
        with mlflow.start_run(run_id=run_id):
            _log(path)


def _log(path: Path) -> None:
    import mlflow

    manifest = read_manifest(path)
    for name, dsdict in load_datasets(path).items():
        for split, ds in dsdict.items():
            info = manifest.split(name, split)
            dataset = mlflow.data.from_huggingface(
                ds,
                path=str(path / name / info.file),
                name=f"fibreflow-{name}-{split}",
                digest=info.sha256[:16],
            )
            mlflow.log_input(dataset, context=split, tags={"dataset_version": manifest.version})
    mlflow.set_tag("dataset_version", manifest.version)
    mlflow.log_artifact(str(path / MANIFEST), artifact_path="datasets")
    mlflow.log_artifact(str(path / TEST_SET), artifact_path="datasets")


def main(overrides: dict[str, Any] | None = None, *, progress: bool = True) -> dict[str, Any]:
    cfg = load_data_config(overrides)
    with open_db() as conn:
        path = build(conn, cfg, progress=progress)
    log_to_mlflow(path)
    manifest = read_manifest(path)
    return {
        "version": manifest.version,
        "path": str(path),
        "rows": {n: {s: v.rows for s, v in parts.items()} for n, parts in manifest.datasets.items()}
        | {"accuracy_test_set": manifest.accuracy_test_set.rows},
    }
