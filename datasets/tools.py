"""FibreFlow's tools: typed, read-only questions over the company's records. The assistant decides which question
is asked and with what arguments; the database computes the answer (sums, counts, date ranges are SQL's job, not a
small model's). Each tool has an OpenAI tool schema (from its arguments model), one parameterised SQL query (bound
parameters only), and runs in a read-only transaction with a statement timeout and a row limit. Bad arguments (an
unknown project, reversed dates, an injection attempt) give a `ToolError` the model can read and act on, never a
database error or a silent empty answer. A project is named by its id or its name; relative periods ("last week")
are "as of the data's date" (fibreflow_meta's `as_of`: a snapshot's date; live data has none, so today)."""

from __future__ import annotations

import datetime as dt
import difflib
import heapq
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, TypeVar

import psycopg
from fibreflow.core.errors import FibreFlowError
from fibreflow.datasets.grounded_qa import ACTIVITY_PHRASES
from fibreflow.datasets.retrieval import Filters, Retriever
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

T = TypeVar("T")
ROW_LIMIT = 200  # rows a query returns at most
LIST_LIMIT = 5  # records a listing shows (its count is of all): what a small model can read and cite
TIMEOUT_MS = 2000  # per query
IDENTIFIER = re.compile(r"\b(?=[\w-]*\d)(?=[\w-]*[A-Za-z-])[A-Za-z0-9][\w-]{4,}\b")  # 0003-P0075, CIV-001
PROJECT = re.compile(r"^\s*(?:prj[-\s_]?|project\s+)?0*(\d{1,4})\s*$", re.I)
NAME = re.compile(r"^[^\W\d_][^;\x00-\x1f]{2,99}$")  # a project's name: starts with a letter, no ; or control
PERIOD = Literal["today", "yesterday", "this_week", "last_week", "this_month", "last_month", "last_7_days",
                 "last_30_days"]  # fmt: skip
POLE_STATUS = Literal["planned", "permission_pending", "permission_granted", "planted", "dressed", "rejected"]
TASK_STATUS = Literal["todo", "in_progress", "blocked", "done"]
POLE_STATUS_NAMES = {"planned": [], "permission_pending": ["waiting for permission"], "permission_granted":
                     ["permitted"], "planted": [], "dressed": [], "rejected": ["refused"]}  # fmt: skip
TASK_STATUS_NAMES = {"todo": ["to do", "not started"], "in_progress": ["ongoing", "under way"], "blocked": ["stuck"],
                     "done": ["finished", "completed", "complete"]}  # fmt: skip
RECORD_TYPE = Literal["project", "task", "boq_item", "pole", "daily_progress", "glossary"]
BOQ_CATEGORY = {"CIV": "civil works", "AER": "aerial", "CAB": "cabling", "SPL": "splicing", "TST": "testing",
                "CON": "home connections", "DOC": "documentation", "PM": "project management"}  # fmt: skip


class ToolError(FibreFlowError):
    """A tool call the records cannot answer as asked: the message says why, for the model to read."""


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def canonical_project(v: str) -> str:
    """PRJ-0003, prj-3, 'project 3' -> PRJ-0003; a project's name -> the name in lower case with single spaces (the
    tool looks it up); anything else is refused before any SQL."""
    m = PROJECT.match(v)
    if m is not None:
        return f"PRJ-{int(m.group(1)):04d}"
    name = " ".join(v.split())
    if NAME.match(name) is None:
        raise ValueError(f"{v!r} is not a project id like PRJ-0003 or a project's name")
    return name.casefold()


def period_dates(period: str, as_of: dt.date) -> tuple[dt.date, dt.date]:
    """(first, last day) of a period up to `as_of`; weeks start on Monday."""
    day = dt.timedelta(days=1)
    monday, first = as_of - as_of.weekday() * day, as_of.replace(day=1)
    return {
        "today": (as_of, as_of),
        "yesterday": (as_of - day, as_of - day),
        "this_week": (monday, as_of),
        "last_week": (monday - 7 * day, monday - day),
        "this_month": (first, as_of),
        "last_month": ((first - day).replace(day=1), first - day),
        "last_7_days": (as_of - 6 * day, as_of),
        "last_30_days": (as_of - 29 * day, as_of),
    }[period]


class ProjectArgs(Args):
    project_id: str = Field(max_length=100, description="The project's id (PRJ-0003) or its name")

    @field_validator("project_id")
    @classmethod
    def _canonical(cls, v: str) -> str:
        return canonical_project(v)


class PoleArgs(ProjectArgs):
    status: POLE_STATUS | None = Field(None, description="Only poles in this status")

    @field_validator("status", mode="before")
    @classmethod
    def _status(cls, v: Any) -> Any:
        return resolve(v, POLE_STATUS_NAMES, "pole status") if isinstance(v, str) else v


def resolve(value: str, options: dict[str, list[str]], what: str) -> str:
    """`value` as one of `options`' keys: the key or one of its names in any case and spacing, else the option that
    shares the most word starts (four letters, then five on a tie) with the value's words, if one option shares more
    than any other ("splicing" -> SPL, "cable" -> CAB, "planting" -> pole_planting, "still dressed" -> dressed,
    "still_planting" -> planted, not planned). A model names things loosely; the tool should not fail it for that."""

    def norm(s: str) -> str:
        return " ".join(re.sub(r"[^a-z0-9]+", " ", s.lower()).split())

    v = norm(value)
    for key, names in options.items():
        if v in {norm(key), *map(norm, names)}:
            return key

    def starts(words: list[str], n: int) -> set[str]:
        return {w[:n] for w in words if len(w) >= n}

    mine = starts(v.split(), 4), starts(v.split(), 5)

    def share(names: list[str]) -> tuple[int, int]:
        theirs = [w for n in names for w in norm(n).split()]
        return len(mine[0] & starts(theirs, 4)), len(mine[1] & starts(theirs, 5))

    shared = sorted(((share([key, *names]), key) for key, names in options.items()), reverse=True)
    if shared[0][0][0] > 0 and (len(shared) == 1 or shared[1][0] < shared[0][0]):
        return shared[0][1]
    raise ValueError(f"{value!r} is not a {what}; one of: {', '.join(options)}")


class BoqArgs(ProjectArgs):
    category: Literal["CIV", "AER", "CAB", "SPL", "TST", "CON", "DOC", "PM"] | None = Field(
        None, description="Only this BOQ category: " + ", ".join(f"{k} {v}" for k, v in BOQ_CATEGORY.items())
    )

    @field_validator("category", mode="before")
    @classmethod
    def _category(cls, v: Any) -> Any:
        return resolve(v, {k: [n] for k, n in BOQ_CATEGORY.items()}, "BOQ category") if isinstance(v, str) else v


class ProgressArgs(ProjectArgs):
    start: dt.date | None = Field(None, description="First day, inclusive (YYYY-MM-DD)")
    end: dt.date | None = Field(None, description="Last day, inclusive (YYYY-MM-DD)")
    period: PERIOD | None = Field(None, description="Instead of start and end: a period up to the data's date")
    activity: str | None = Field(None, max_length=100, description="Only this activity, e.g. trenching, pole_planting")

    @field_validator("period", mode="before")
    @classmethod
    def _period(cls, v: Any) -> Any:
        return re.sub(r"[\s-]+", "_", v.strip().lower()) if isinstance(v, str) else v  # "last week" -> last_week

    @field_validator("activity")
    @classmethod
    def _activity(cls, v: str | None) -> str | None:
        """A known activity by any of its names; another one is looked up as given (the tool says if it is none)."""
        if v is None:
            return None
        try:
            return resolve(v, {k: [p] for k, p in ACTIVITY_PHRASES.items()}, "activity")
        except ValueError:
            return v

    @model_validator(mode="after")
    def _ordered(self) -> ProgressArgs:
        if self.period is not None and (self.start or self.end):
            raise ValueError("give either a period or start and end, not both")
        if self.period is None and (self.start is None or self.end is None):
            raise ValueError("give start and end (YYYY-MM-DD), or a period such as last_week")
        if self.start and self.end and self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self


class TaskArgs(ProjectArgs):
    status: TASK_STATUS | None = Field(None, description="Only tasks in this status")

    @field_validator("status", mode="before")
    @classmethod
    def _status(cls, v: Any) -> Any:
        return resolve(v, TASK_STATUS_NAMES, "task status") if isinstance(v, str) else v


class SearchArgs(Args):
    query: str = Field(min_length=1, max_length=300, description="What to look for, in words")
    project_id: str | None = Field(
        None, max_length=100, description="Only this project's records: its id (PRJ-0003) or name"
    )
    record_type: RECORD_TYPE | None = Field(None, description="Only records of this type")
    region: str | None = Field(None, max_length=100, description="Only records of projects in this region")
    date_from: dt.date | None = Field(None, description="Only records dated on or after this day (YYYY-MM-DD)")
    date_to: dt.date | None = Field(None, description="Only records dated on or before this day (YYYY-MM-DD)")
    k: int = Field(4, ge=1, le=10, description="How many records")

    @field_validator("project_id")
    @classmethod
    def _canonical(cls, v: str | None) -> str | None:
        return None if v is None else canonical_project(v)

    @model_validator(mode="after")
    def _ordered(self) -> SearchArgs:
        if self.date_from and self.date_to and self.date_to < self.date_from:
            raise ValueError(f"date_to {self.date_to} is before date_from {self.date_from}")
        return self


@dataclass(frozen=True)
class ToolResult:
    tool: str
    arguments: dict[str, Any]
    data: dict[str, Any]
    record_ids: list[str]  # what the answer should cite

    def content(self) -> str:
        """The `tool` turn the model reads: the data as compact JSON."""
        return json.dumps(self.data, ensure_ascii=False, separators=(",", ":"))


def schemas() -> list[dict[str, Any]]:
    """Every tool's OpenAI `tools` entry."""
    return [t.schema() for t in TOOLS.values()]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args: type[Args]
    run: Callable[..., tuple[dict[str, Any], list[str]]]  # (conn, args[, retriever]) -> (data, record ids)
    searches: bool = False  # needs the records' embeddings (a Retriever)

    def schema(self) -> dict[str, Any]:
        """The OpenAI `tools` entry."""
        params = self.args.model_json_schema()
        params.pop("title", None)
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": params}}  # fmt: skip


def _rows(conn: psycopg.Connection, sql: str, params: dict[str, Any], limit: int | None = ROW_LIMIT + 1
          ) -> list[dict[str, Any]]:  # fmt: skip
    """At most `limit` rows of `sql` (bound `params` only), as dicts with JSON-ready values."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(sql, params)  # type: ignore[arg-type]
        rows = cur.fetchall() if limit is None else cur.fetchmany(limit)
    return [{k: float(v) if isinstance(v, Decimal) else v.isoformat() if isinstance(v, dt.date) else v
             for k, v in r.items()} for r in rows]  # fmt: skip


def resolve_project(conn: psycopg.Connection, ref: str) -> dict[str, Any]:
    """The project `ref` (as `canonical_project` gives it) names: its id, its whole name (any case), the one project
    whose name contains it, or the one name it misspells. A ToolError says why none or several."""
    columns = "SELECT id, name, status, start_date, target_end_date, homes_planned FROM projects"
    rows = _rows(conn, f"{columns} WHERE id = %(p)s OR lower(name) = %(p)s ORDER BY id LIMIT 6", {"p": ref})
    is_name = PROJECT.match(ref) is None
    if not rows and is_name:
        like = "%" + ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = _rows(conn, f"{columns} WHERE lower(name) LIKE %(like)s ORDER BY id LIMIT 6", {"like": like})
    if len(rows) > 1:  # a part of several names, or a name several projects share
        named = ", ".join(f"{r['id']} ({r['name']})" for r in rows)
        raise ToolError(f"{ref!r} names more than one project: {named}; use its id")
    if rows:
        return rows[0]
    every = conn.execute("SELECT id, name FROM projects ORDER BY id").fetchall()  # all: thousands at most
    if is_name:  # the one name it misspells: the same numbers ("Phase 4" never means "Phase 3"), at least 90% alike
        digits = re.findall(r"\d+", ref)  # and clearly closer than any other such name
        same = most_alike(ref, [(n.casefold(), i) for i, n in every if re.findall(r"\d+", n) == digits], 2)
        if same and same[0][0] >= 0.9 and (len(same) == 1 or same[1][0] <= same[0][0] - 0.05):
            return _rows(conn, f"{columns} WHERE id = %(p)s", {"p": same[0][1]})[0]
    alike = most_alike(ref, [(n.casefold() if is_name else i, (i, n)) for i, n in every], 5)
    closest = ", ".join(f"{i} ({n})" for _, (i, n) in alike)
    raise ToolError(f"no project {ref}; closest projects: {closest or 'none (there are no projects)'}")


def most_alike(ref: str, candidates: Sequence[tuple[str, T]], k: int) -> list[tuple[float, T]]:
    """The `k` (text, item) candidates whose text is most alike to `ref` (difflib ratio), best first, ties in the
    given order: what scoring and sorting them all would give. The ratio is costly; its cheap upper bound,
    `quick_ratio` (the same either way round, so counted against `ref` once), orders the candidates, and scoring
    stops where the bound falls below the k-th best score."""
    bound = difflib.SequenceMatcher(None, "", ref)  # ref as the second sequence: its character counts kept
    exact = difflib.SequenceMatcher(None, ref)  # the ratio as SequenceMatcher(None, ref, text) gives it
    bounds = []
    for i, (text, _) in enumerate(candidates):
        bound.set_seq1(text)
        bounds.append((-bound.quick_ratio(), i))
    best: list[tuple[float, int]] = []  # a min-heap of (score, -position): its root is the k-th best
    for negative, i in sorted(bounds):
        if len(best) == k and -negative < best[0][0]:
            break  # an equal bound may still tie, and an earlier candidate wins a tie
        exact.set_seq2(candidates[i][0])
        entry = (exact.ratio(), -i)
        if len(best) < k:
            heapq.heappush(best, entry)
        elif entry > best[0]:
            heapq.heapreplace(best, entry)
    return [(score, candidates[-j][1]) for score, j in sorted(best, key=lambda e: (-e[0], -e[1]))]


def as_of_date(conn: psycopg.Connection) -> dt.date:
    """The data's date: a snapshot's `as_of` (the demo seed's), else today."""
    row = _rows(conn, "SELECT coalesce((SELECT (value->>'as_of')::date FROM fibreflow_meta"
                      " WHERE key = 'data_source'), current_date) AS as_of", {})  # fmt: skip
    return dt.date.fromisoformat(row[0]["as_of"])


def project_status(conn: psycopg.Connection, a: ProjectArgs) -> tuple[dict[str, Any], list[str]]:
    p = resolve_project(conn, a.project_id)
    tasks = _rows(conn, "SELECT status, count(*) AS tasks FROM tasks WHERE project_id = %(p)s GROUP BY status"
                        " ORDER BY status", {"p": p["id"]})  # fmt: skip
    data = {"project": p, "tasks_by_status": {r["status"]: r["tasks"] for r in tasks}, "as_of": str(as_of_date(conn))}
    return data, [p["id"]]


def pole_counts(conn: psycopg.Connection, a: PoleArgs) -> tuple[dict[str, Any], list[str]]:
    pid = resolve_project(conn, a.project_id)["id"]
    rows = _rows(conn, "SELECT status, count(*) AS poles FROM poles WHERE project_id = %(p)s"
                       " AND (%(s)s::text IS NULL OR status = %(s)s) GROUP BY status ORDER BY status",
                 {"p": pid, "s": a.status})  # fmt: skip
    counts = {r["status"]: r["poles"] for r in rows}
    return {"project_id": pid, "poles_by_status": counts, "total": sum(counts.values()), "unit": "poles"}, [pid]


def boq_totals(conn: psycopg.Connection, a: BoqArgs) -> tuple[dict[str, Any], list[str]]:
    pid = resolve_project(conn, a.project_id)["id"]
    rows = _rows(conn, "SELECT split_part(item_code, '-', 1) AS category, unit, sum(quantity) AS quantity,"
                       " round(sum(quantity * rate_zar), 2) AS amount_zar, count(*) AS items FROM boq_items"
                       " WHERE project_id = %(p)s AND (%(c)s::text IS NULL OR split_part(item_code, '-', 1) = %(c)s)"
                       " GROUP BY 1, 2 ORDER BY 1, 2", {"p": pid, "c": a.category})  # fmt: skip
    by: dict[str, dict[str, Any]] = {}
    for r in rows:  # compact: one entry per category, its quantities by unit (the model reads all of it)
        c = by.setdefault(r["category"], {"amount_zar": 0.0, "quantities": {}})
        c["amount_zar"] = round(c["amount_zar"] + r["amount_zar"], 2)
        c["quantities"][r["unit"]] = r["quantity"]
    total = round(sum(c["amount_zar"] for c in by.values()), 2)
    return {"project_id": pid, "total_zar": total, "by_category": by}, [pid]


def progress(conn: psycopg.Connection, a: ProgressArgs) -> tuple[dict[str, Any], list[str]]:
    pid = resolve_project(conn, a.project_id)["id"]
    if a.period is None:
        as_of, start, end = None, a.start, a.end
    else:
        as_of = as_of_date(conn)
        start, end = period_dates(a.period, as_of)
    rows = _rows(conn, "SELECT activity, unit, sum(quantity) AS quantity, count(DISTINCT report_date) AS days"
                       " FROM daily_progress WHERE project_id = %(p)s AND report_date BETWEEN %(a)s AND %(b)s"
                       " AND (%(act)s::text IS NULL OR activity = %(act)s) GROUP BY activity, unit ORDER BY activity",
                 {"p": pid, "a": start, "b": end, "act": a.activity})  # fmt: skip
    if a.activity is not None and not rows:  # none in the span: said as a zero in its unit, not left to be inferred
        units = {r["activity"]: r["unit"] for r in _rows(conn, "SELECT DISTINCT ON (activity) activity, unit FROM"
                 " daily_progress WHERE project_id = %(p)s ORDER BY activity, unit", {"p": pid})}  # fmt: skip
        if a.activity not in units:
            raise ToolError(f"progress: no activity {a.activity!r} on {pid}; its activities: {', '.join(units)}")
        rows = [{"activity": a.activity, "unit": units[a.activity], "quantity": 0.0, "days": 0}]
    assert start is not None and end is not None  # the arguments' validator: dates or a period
    span = {"period": a.period, "as_of": str(as_of)} if a.period else {}
    return {"project_id": pid, **span, "start": start.isoformat(), "end": end.isoformat(), "by_activity": rows}, [pid]


def task_status(conn: psycopg.Connection, a: TaskArgs) -> tuple[dict[str, Any], list[str]]:
    pid = resolve_project(conn, a.project_id)["id"]
    rows = _rows(conn, "SELECT count(*) OVER () AS total, id, phase, title, status, assignee, due_date FROM tasks"
                       " WHERE project_id = %(p)s AND (%(s)s::text IS NULL OR status = %(s)s) ORDER BY due_date, id"
                       " LIMIT %(n)s", {"p": pid, "s": a.status, "n": LIST_LIMIT})  # fmt: skip
    count = rows[0]["total"] if rows else 0
    for r in rows:
        del r["total"]
    return {"project_id": pid, "count": count, "tasks": rows}, [f"task:{r['id']}" for r in rows]


def search_records(conn: psycopg.Connection, a: SearchArgs, retriever: Retriever) -> tuple[dict[str, Any], list[str]]:
    pid = None if a.project_id is None else resolve_project(conn, a.project_id)["id"]
    filters = Filters(project_id=pid, region=a.region, record_type=a.record_type, date_from=a.date_from,
                      date_to=a.date_to)  # fmt: skip
    found = {}  # a query naming identifiers (a pole number, a BOQ code) gets their records, found by text: near-
    for needle in IDENTIFIER.findall(a.query):  # identical names are what embeddings cannot tell apart
        if PROJECT.match(needle) is None:
            found |= {h.record_id: h for h in retriever.containing(conn, needle, a.k, filters)}
    hits = list(found.values())[: a.k] or retriever.search(conn, a.query, a.k, filters)  # else: by meaning
    if not hits:
        raise ToolError(f"search_records: no records match {a.model_dump(exclude_none=True, mode='json')}")
    rows = [{"record_id": h.record_id, "record_type": h.record_type, "project_id": h.project_id,
             "content": h.content, "score": round(h.score, 3)} for h in hits]  # fmt: skip
    return {"records": rows}, [h.record_id for h in hits]


TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("project_status", "A project's name, status, dates, homes planned and its tasks by status.", ProjectArgs,
         project_status),
    Tool("pole_counts", "How many poles a project has in each status (planned, permission_pending, ...).", PoleArgs,
         pole_counts),
    Tool("boq_totals", "A project's bill of quantities: amounts in ZAR and quantities by unit, per category "
         "(" + ", ".join(f"{k} {v}" for k, v in BOQ_CATEGORY.items()) + ").",
         BoqArgs, boq_totals),
    Tool("progress", "Work done on a project between two dates or in a period (last_week, this_month, last_7_days, "
         "...), by activity, with units.", ProgressArgs, progress),
    Tool("task_status", "How many tasks a project has (optionally in one status) and the first five by due date.",
         TaskArgs, task_status),
    Tool("search_records", "Records (projects, tasks, BOQ items, poles, daily reports, glossary) closest in meaning "
         "to a query, within optional filters: for questions the other tools do not answer.", SearchArgs,
         search_records, searches=True),
)}  # fmt: skip


def run_tool(
    conn: psycopg.Connection,
    name: str,
    arguments: dict[str, Any],
    timeout_ms: int = TIMEOUT_MS,
    retriever: Retriever | None = None,
) -> ToolResult:
    """Validate `arguments`, then run the tool's SQL read-only within `timeout_ms` (the record search with
    `retriever`: the records' embeddings table and the model that built it)."""
    tool = TOOLS.get(name)
    if tool is None:
        raise ToolError(f"no tool {name!r}; the tools are: {', '.join(TOOLS)}")
    if tool.searches and retriever is None:
        raise ToolError(f"{name}: the record search is not available here (no embeddings index configured)")
    try:
        args = tool.args.model_validate(arguments)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors())
        raise ToolError(f"{name}: {problems}") from None
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
            data, ids = tool.run(conn, args, retriever) if tool.searches else tool.run(conn, args)
    except psycopg.errors.QueryCanceled:
        raise ToolError(f"{name}: the records took longer than {timeout_ms} ms to answer; ask for less") from None
    return ToolResult(name, args.model_dump(mode="json"), data, ids)
