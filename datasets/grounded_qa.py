"""Grounded QA over FibreFlow records: every answer computed in SQL, every question with its contexts.

Each family is one SQL query (streamed through a server-side cursor) plus a pure function that turns a result
row into an example. Contexts are the `fibreflow_corpus` renderings of the records the answer comes from, the
same texts that `fibreflow embed` indexes, so RAG evaluation can check retrieval against them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from fibreflow.core.config import Strict


class GroundedQAConfig(Strict):
    test_fraction: float
    split_salt: str
    pole_statuses: list[str]
    progress_ranges_per_project: int
    task_questions_per_project: int


ACTIVITY_PHRASES = {
    "trenching": "metres of trenching",
    "micro_trenching": "metres of micro-trenching",
    "duct_installation": "metres of duct installed",
    "cable_blowing": "metres of cable blown",
    "pole_planting": "poles planted",
    "splicing": "fusion splices made",
    "home_connections": "homes connected",
}


def words(status: str) -> str:
    return status.replace("_", " ")


def number(x: Decimal | int | float) -> str:
    """Canonical number text: no exponent, no trailing zeros ('1200', '585507.89')."""
    d = Decimal(str(x)).normalize()
    return format(d, "f") if d != d.to_integral() else str(int(d))


def money(x: Decimal) -> str:
    return f"R {Decimal(x).quantize(Decimal('0.01')):,}"


@dataclass(frozen=True)
class Family:
    """One kind of question: its SQL (parameters: test_ids, salt, statuses, n_ranges, n_tasks) and row mapper."""

    name: str
    sql: str
    to_example: Callable[[dict[str, Any]], dict[str, Any]]


def _example(
    fam: str,
    key: str,
    row: dict[str, Any],
    question: str,
    answer: str,
    reference: str,
    kind: str,
    contexts: list[str],
    unit: str | None = None,
    tolerance: dict[str, float] | None = None,
) -> dict[str, Any]:
    return {
        "id": f"qa-{fam}-{key}",
        "family": fam,
        "project_id": row["project_id"],
        "question": question,
        "answer": answer,
        "reference": reference,
        "kind": kind,
        "contexts": contexts,
        "unit": unit,
        "tolerance": tolerance,
    }


def _status(row: dict[str, Any]) -> dict[str, Any]:
    q = f"What is the current status of project {row['project_id']} ({row['name']})?"
    a = (
        f"Project {row['project_id']} ({row['name']}) is {words(row['status'])}; "
        f"its target end date is {row['target_end_date']}."
    )
    return _example("project_status", row["project_id"], row, q, a, words(row["status"]), "contains", [row["content"]])


def _poles(row: dict[str, Any]) -> dict[str, Any]:
    q = f"How many poles on project {row['project_id']} ({row['name']}) have the status {words(row['status'])}?"
    a = f"Project {row['project_id']} has {row['n']} poles with status {words(row['status'])}."
    return _example(
        "pole_count",
        f"{row['project_id']}-{row['status']}",
        row,
        q,
        a,
        str(row["n"]),
        "numeric",
        [row["content"]],
        unit="poles",
        tolerance={"abs": 0.0, "rel": 0.0},
    )


def _boq(row: dict[str, Any]) -> dict[str, Any]:
    q = f"What is the total BOQ value of project {row['project_id']} ({row['name']})?"
    a = f"The BOQ for project {row['project_id']} totals {money(row['total'])} over {row['lines']} lines."
    return _example(
        "boq_total",
        row["project_id"],
        row,
        q,
        a,
        number(round(row["total"], 2)),
        "numeric",
        row["contexts"],
        unit="ZAR",
        tolerance={"abs": 0.01, "rel": 0.001},
    )


def _progress(row: dict[str, Any]) -> dict[str, Any]:
    start: dt.date = row["week_start"]
    end = start + dt.timedelta(days=6)
    phrase = ACTIVITY_PHRASES.get(row["activity"], f"{words(row['activity'])} in {row['unit']}")
    q = f"How many {phrase} did project {row['project_id']} ({row['name']}) report between {start} and {end}?"
    a = (
        f"Project {row['project_id']} reported {number(row['total'])} {row['unit']} of {words(row['activity'])} "
        f"between {start} and {end}, over {row['reports']} daily reports."
    )
    return _example(
        "progress_range",
        f"{row['project_id']}-{row['activity']}-{start}",
        row,
        q,
        a,
        number(row["total"]),
        "numeric",
        row["contexts"],
        unit=row["unit"],
        tolerance={"abs": 0.05, "rel": 0.0},
    )


def _task(row: dict[str, Any]) -> dict[str, Any]:
    q = f'What is the status of the task "{row["title"]}" (task {row["task_id"]}) on project {row["project_id"]}?'
    a = f'Task {row["task_id"]} "{row["title"]}" is {words(row["status"])}.'
    return _example("task_status", str(row["task_id"]), row, q, a, words(row["status"]), "contains", [row["content"]])


_PROJECT_DOCS = "(SELECT project_id, content FROM fibreflow_corpus WHERE record_type = 'project')"

FAMILIES: tuple[Family, ...] = (
    Family(
        "project_status",
        f"""
        SELECT p.id AS project_id, p.name, p.status, p.target_end_date, c.content
        FROM projects p JOIN {_PROJECT_DOCS} c ON c.project_id = p.id
        ORDER BY p.id""",
        _status,
    ),
    Family(
        "pole_count",
        f"""
        SELECT p.id AS project_id, p.name, s.status, coalesce(pc.n, 0) AS n, c.content
        FROM projects p
        CROSS JOIN unnest(%(statuses)s::text[]) AS s(status)
        LEFT JOIN (SELECT project_id, status, count(*) AS n FROM poles GROUP BY project_id, status) pc
               ON pc.project_id = p.id AND pc.status = s.status
        JOIN {_PROJECT_DOCS} c ON c.project_id = p.id
        WHERE EXISTS (SELECT 1 FROM poles x WHERE x.project_id = p.id)
        ORDER BY p.id, s.status""",
        _poles,
    ),
    Family(
        "boq_total",
        """
        SELECT b.project_id, p.name, sum(b.quantity * b.rate_zar) AS total, count(*) AS lines,
               array_agg(c.content ORDER BY b.item_code) AS contexts
        FROM boq_items b JOIN projects p ON p.id = b.project_id
        JOIN (SELECT record_id, content FROM fibreflow_corpus WHERE record_type = 'boq_item') c
          ON c.record_id = 'boq_item:' || b.id
        GROUP BY b.project_id, p.name
        ORDER BY b.project_id""",
        _boq,
    ),
    Family(
        "progress_range",
        """
        WITH weeks AS (
            SELECT project_id, activity, unit, date_trunc('week', report_date)::date AS week_start
            FROM daily_progress GROUP BY 1, 2, 3, 4
        ), picked AS (
            SELECT * FROM (
                SELECT w.*, row_number() OVER (PARTITION BY project_id
                                               ORDER BY md5(project_id || activity || week_start || %(salt)s)) AS rn
                FROM weeks w) ranked
            WHERE rn <= %(n_ranges)s
        )
        SELECT k.project_id, p.name, k.activity, k.unit, k.week_start, sum(d.quantity) AS total,
               count(*) AS reports, array_agg(c.content ORDER BY d.report_date, d.id) AS contexts
        FROM picked k JOIN projects p ON p.id = k.project_id
        JOIN daily_progress d ON d.project_id = k.project_id AND d.activity = k.activity
                             AND d.report_date BETWEEN k.week_start AND k.week_start + 6
        JOIN (SELECT record_id, content FROM fibreflow_corpus WHERE record_type = 'daily_progress') c
          ON c.record_id = 'daily_progress:' || d.id
        GROUP BY k.project_id, p.name, k.activity, k.unit, k.week_start
        ORDER BY k.project_id, k.week_start, k.activity""",
        _progress,
    ),
    Family(
        "task_status",
        """
        SELECT t.project_id, t.id AS task_id, t.title, t.status, c.content
        FROM (SELECT t.*, row_number() OVER (PARTITION BY project_id ORDER BY md5(t.id || %(salt)s)) AS rn
              FROM tasks t) t
        JOIN (SELECT record_id, content FROM fibreflow_corpus WHERE record_type = 'task') c
          ON c.record_id = 'task:' || t.id
        WHERE t.rn <= %(n_tasks)s
        ORDER BY t.project_id, t.id""",
        _task,
    ),
)


def params(cfg: GroundedQAConfig) -> dict[str, Any]:
    return {
        "salt": cfg.split_salt,
        "statuses": cfg.pole_statuses,
        "n_ranges": cfg.progress_ranges_per_project,
        "n_tasks": cfg.task_questions_per_project,
    }


def test_projects(project_ids: list[str], cfg: GroundedQAConfig) -> set[str]:
    """Projects held out for test: the `test_fraction` whose salted hash ranks lowest (at least one).

    Ranking by hash (not thresholding it) gives an exact share even for 10 projects, and adding projects
    moves few existing ones between splits.
    """
    if not project_ids:
        return set()
    ranked = sorted(project_ids, key=lambda p: hashlib.sha256(f"{cfg.split_salt}:{p}".encode()).hexdigest())
    return set(ranked[: max(1, math.ceil(cfg.test_fraction * len(ranked)))])


def rag_messages(system: str, question: str, contexts: list[str], answer: str) -> list[dict[str, str]]:
    """The chat a RAG-grounded model is trained/evaluated on: records, then the question."""
    records = "\n".join(f"- {c}" for c in contexts)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Records:\n{records}\n\nQuestion: {question}"},
        {"role": "assistant", "content": answer},
    ]
