"""Tool-calling conversations built from the records: what the assistant is fine-tuned on to answer data
questions (datasets/agent.py's loop), and its held-out test questions.

One conversation per question: the question -> the right tool call -> the tool's real result (run on the build's
snapshot, exactly as serving runs it) -> a short answer that states the number with its unit and cites the
records. A question may name the project by its name instead of its id (the call then passes the name, the
tool looks it up), or a period relative to the data's date ("last week": the call passes the period, the tool
computes the dates). Record questions get RAFT-style results: the right record among distractors of the same
project and type, as the record search returns them. Also: glossary questions asked with the tools offered
(answered directly, no call), made-up terms and questions the records cannot answer (the refusal, with the tools
offered). And recoveries: a question whose first call is wrong the way a small model gets it wrong (an argument
the tool does not take, a made-up BOQ category, dates the wrong way round), the tool's real error, then the right
call, its result and the answer; the wrong call is context (`weight: 0`), never learned. And call drills: a train
question asked again in other phrasings, learned up to its call only (the call is what the loop hinges on; a drill
costs ~80 tokens); and name drills: a train question asked about a made-up project (a place no project is in), up
to its call, which passes the name as written (a handful of projects' names are too few to learn copying one from).

Held out twice: test projects (grounded_qa's split) are never in training, and test questions use phrasings
training never uses. Made-up terms are generated deterministically, none in both splits.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from fibreflow.core.config import Strict
from fibreflow.core.errors import DatasetBuildError
from fibreflow.datasets.agent import ERROR
from fibreflow.datasets.grounded_qa import ACTIVITY_PHRASES, number, words
from fibreflow.datasets.seed import AREAS
from fibreflow.datasets.tools import (
    BOQ_CATEGORY,
    ToolError,
    ToolResult,
    as_of_date,
    canonical_project,
    period_dates,
    resolve_project,
    run_tool,
)
from pydantic import Field, model_validator

FAMILIES = ("project_status", "pole_total", "pole_counts", "boq_total", "boq_category", "progress", "progress_recent",
            "task_status", "pole_record")  # fmt: skip
PERIODS = {"last_week": "last week", "this_week": "this week", "last_month": "last month", "this_month": "this month",
           "last_7_days": "in the last 7 days", "last_30_days": "in the last 30 days",
           "yesterday": "yesterday"}  # fmt: skip
# the progress tool's relative periods as a question says them ("as of the data's date": the tool resolves them)
# The call a small model makes instead of the right one, with arguments its tool refuses, for the families whose
# recoveries start with a wrong call: (right arguments, a salted int) -> the wrong ones. project_status given a status,
# a whole-BOQ total given a made-up category (most calls have two arguments), a period's dates swapped.
MISTAKES: dict[str, Callable[[dict[str, Any], int], dict[str, Any]]] = {
    "project_status": lambda a, k: a | {"status": ("latest", "current", "active", "overall")[k % 4]},
    "boq_total": lambda a, k: a | {"category": ("BOQ", "TOTAL", "ALL", "ZAR")[k % 4]},
    "progress": lambda a, k: a | {"start": a["end"], "end": a["start"]},
}
TERM_MISTAKES = ("project_status", "task_status", "pole_counts", "boq_totals")  # a made-up term taken for a project


class Phrasings(Strict):
    train: list[str] = Field(min_length=1)
    test: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _disjoint(self) -> Phrasings:
        if {t.lower() for t in self.train} & {t.lower() for t in self.test}:
            raise ValueError("train and test phrasings must be disjoint")
        return self


class MadeUp(Strict):
    train: int = Field(ge=0)
    test: int = Field(ge=0)
    prefixes: list[str]
    suffixes: list[str]
    nouns: list[str]


class Unanswerable(Strict):
    train: list[str]
    test: list[str]
    answer: str


class MadeUpProjects(Strict):
    per_project: int = Field(ge=0)  # name drills per train project
    places: list[str] = Field(min_length=1)  # made-up projects are named "<place> <area> FTTH|FTTB Phase <n>"


class AssistantConfig(Strict):
    questions: dict[str, Phrasings]  # per family
    per_project: dict[str, int]  # the mixture: conversations per project and family (train and test alike); a
    # project's repeated question (its status, its BOQ total) is asked in another phrasing each time
    typo_share: float = Field(ge=0, le=0.5)  # train questions with one typo
    glossary_with_tools: int = Field(ge=0)  # glossary questions asked with the tools offered
    recoveries: int = Field(0, ge=0)  # per train project: questions asked again with a wrong first call (MISTAKES)
    refusal_recoveries: int = Field(0, ge=0)  # train made-up terms asked again with a wrong first call (`refusals`)
    call_drills: int = Field(0, ge=0)  # per train question: asked again that many times in the next phrasings, each
    # learned up to its call (no result, no answer): the call is what the loop hinges on, and it is cheap
    made_up_projects: MadeUpProjects | None = None  # name drills (`grounded`)
    made_up: MadeUp
    unanswerable: Unanswerable

    @model_validator(mode="after")
    def _families(self) -> AssistantConfig:
        for key in (*self.questions, *self.per_project):
            if key not in FAMILIES:
                raise ValueError(f"unknown family {key!r}; the families are {', '.join(FAMILIES)}")
        if set(self.unanswerable.train) & set(self.unanswerable.test):
            raise ValueError("unanswerable: train and test questions must be disjoint")
        return self


def salted(*parts: Any) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def typo(question: str, key: str, keep: str = "") -> str:
    """The question with two neighbouring letters of one longer word swapped (ids, dates and the words of `keep`:
    what the call repeats, a name, a period, left alone)."""
    candidates = [m for m in re.finditer(r"\b[a-z]{5,}\b", question) if m.group() not in keep.split()]
    if not candidates:
        return question
    m = candidates[int(key[:8], 16) % len(candidates)]
    i = m.start() + 1 + int(key[8:12], 16) % (len(m.group()) - 2)
    return question[:i] + question[i + 1] + question[i] + question[i + 2 :]


@dataclass(frozen=True)
class Ask:
    """One grounded question: the call that answers it, and how its answer is scored."""

    family: str
    project_id: str
    slots: dict[str, str]
    tool: str
    arguments: dict[str, Any]
    kind: str  # numeric | contains
    answer: Callable[[ToolResult], tuple[str, str]]  # result -> (answer text, reference)
    unit: str | None = None
    tolerance: dict[str, float] | None = None
    result: dict[str, Any] | None = None  # a prepared result (record questions): not run through a tool


def rand(x: float) -> str:
    """An amount as the tool gave it ("R 2834037.29"): a number a small model copies, not one it re-formats."""
    return f"R {number(round(x, 2))}"


def _cite(ids: list[str], most: int = 3) -> str:
    return "[" + ", ".join(ids[:most]) + (", ..." if len(ids) > most else "") + "]"


def project_asks(conn: psycopg.Connection, p: dict[str, Any], cfg: AssistantConfig, nth: int | None = None
                 ) -> Iterator[Ask]:  # fmt: skip
    """Every question of the mixture about project `p` (id, name), picked deterministically. `nth`: the project's
    place among the training projects (None: a test project). A training project takes the values of the fixed lists
    (pole and task statuses, BOQ categories, relative periods) in turn from where the one before stopped, so that
    across projects every value is taught (at random, 16 questions over 8 categories had left one out); a test
    project's are picked at random, a period among those with work."""
    pid, n = p["id"], cfg.per_project

    def pick(family: str, options: list[Any]) -> list[Any]:
        ranked = sorted(options, key=lambda o: salted(family, pid, o))
        return ranked[: n.get(family, 0)]

    def turns(family: str, options: list[Any]) -> list[Any]:
        k = n.get(family, 0)
        return pick(family, options) if nth is None else [options[(nth * k + j) % len(options)]
                                                          for j in range(min(k, len(options)))]  # fmt: skip

    def status_answer(r: ToolResult) -> tuple[str, str]:
        d = r.data
        tasks = ", ".join(f"{k} {words(s)}" for s, k in d["tasks_by_status"].items()) or "none"
        text = (f"Project {pid} ({d['project']['name']}) is {words(d['project']['status'])}, target end "
                f"{d['project']['target_end_date']}; tasks: {tasks} (as of {d['as_of']}) {_cite([pid])}.")  # fmt: skip
        return text, words(d["project"]["status"])

    for _ in range(n.get("project_status", 0)):
        yield Ask("project_status", pid, {}, "project_status", {"project_id": pid}, "contains",
                  status_answer)  # fmt: skip
    for _ in range(n.get("pole_total", 0)):  # all of a project's poles: pole_counts without a status

        def all_poles(r: ToolResult) -> tuple[str, str]:
            k, by = r.data["total"], r.data["poles_by_status"]
            parts = ", ".join(f"{c} {words(s)}" for s, c in by.items()) or "none yet"
            return f"Project {pid} has {k} poles: {parts} {_cite([pid])}.", str(k)

        yield Ask("pole_total", pid, {}, "pole_counts", {"project_id": pid}, "numeric", all_poles, "poles",
                  {"abs": 0.0, "rel": 0.0})  # fmt: skip
    statuses = ["permission_pending", "planted", "dressed", "planned", "rejected", "permission_granted"]
    for status in turns("pole_counts", statuses):

        def poles(r: ToolResult, s: str = status) -> tuple[str, str]:
            k = r.data["poles_by_status"].get(s, 0)
            return f"Project {pid} has {k} poles with status {words(s)} {_cite([pid])}.", str(k)

        yield Ask("pole_counts", pid, {"status": words(status)}, "pole_counts", {"project_id": pid, "status": status},
                  "numeric", poles, "poles", {"abs": 0.0, "rel": 0.0})  # fmt: skip
    for _ in range(n.get("boq_total", 0)):

        def total(r: ToolResult) -> tuple[str, str]:
            t = r.data["total_zar"]
            return f"The BOQ of project {pid} totals {rand(t)} {_cite([pid])}.", number(round(t, 2))

        yield Ask("boq_total", pid, {}, "boq_totals", {"project_id": pid}, "numeric", total, "ZAR",
                  {"abs": 0.01, "rel": 0.001})  # fmt: skip
    for cat in turns("boq_category", sorted(BOQ_CATEGORY)):

        def category(r: ToolResult, c: str = cat) -> tuple[str, str]:
            entry = r.data["by_category"].get(c, {"amount_zar": 0.0, "quantities": {}})
            amount = entry["amount_zar"]
            parts = ", ".join(f"{number(q)} {u}" for u, q in entry["quantities"].items()) or "nothing"
            text = f"{BOQ_CATEGORY[c].capitalize()} ({c}) on project {pid}: {rand(amount)} for {parts} {_cite([pid])}."
            return text, number(amount)

        yield Ask("boq_category", pid, {"category": BOQ_CATEGORY[cat]}, "boq_totals",  # the category as asked:
                  {"project_id": pid, "category": BOQ_CATEGORY[cat]}, "numeric", category, "ZAR",  # the tool maps it
                  {"abs": 0.01, "rel": 0.001})  # fmt: skip
    weeks = conn.execute("SELECT DISTINCT activity, date_trunc('week', report_date)::date, unit FROM daily_progress"
                         " WHERE project_id = %s", (pid,)).fetchall()  # fmt: skip
    for activity, start, unit in pick("progress", sorted(weeks)):
        end = start.fromordinal(start.toordinal() + 6)

        def done(r: ToolResult, a: str = activity, s: Any = start, e: Any = end) -> tuple[str, str]:
            rows = [x for x in r.data["by_activity"] if x["activity"] == a]
            q, unit = (rows[0]["quantity"], rows[0]["unit"]) if rows else (0, "")
            return (f"Between {s} and {e} project {pid} reported {number(q)} {unit} of {words(a)} {_cite([pid])}.",
                    number(q))  # fmt: skip

        yield Ask("progress", pid, {"activity": ACTIVITY_PHRASES.get(activity, words(activity)), "start": str(start),
                                    "end": str(end)}, "progress",
                  {"project_id": pid, "start": str(start), "end": str(end), "activity": activity}, "numeric", done,
                  unit, {"abs": 0.05, "rel": 0.0})  # fmt: skip
    for status in turns("task_status", ["blocked", "in_progress", "todo", "done"]):

        def tasks(r: ToolResult, s: str = status) -> tuple[str, str]:
            rows, k = r.data["tasks"], r.data["count"]
            named = "; ".join(f"{x['title']} (task {x['id']})" for x in rows[:3]) + ("; ..." if k > 3 else "")
            head = f"Project {pid} has {k} {words(s)} tasks"
            return (f"{head}: {named} {_cite(r.record_ids)}." if k else f"{head} {_cite([pid])}."), str(k)

        yield Ask("task_status", pid, {"status": words(status)}, "task_status", {"project_id": pid, "status": status},
                  "numeric", tasks, "tasks", {"abs": 0.0, "rel": 0.0})  # fmt: skip
    as_of = as_of_date(conn)
    spans = {q: period_dates(q, as_of) for q in PERIODS}
    days = conn.execute("SELECT activity, unit, array_agg(report_date) FROM daily_progress WHERE project_id = %s"
                        " GROUP BY 1, 2", (pid,)).fetchall()  # fmt: skip
    recent = sorted((a, u, q) for a, u, ds in days for q in PERIODS)
    worked = [(a, u, q) for a, u, ds in days for q in PERIODS if any(spans[q][0] <= d <= spans[q][1] for d in ds)]
    if nth is None:
        chosen = pick("progress_recent", sorted(worked) or recent)  # a period with work, if any
    else:  # each period in turn, with an activity that has work in it if one has
        chosen = []
        for period in turns("progress_recent", list(PERIODS)):
            options = [x for x in worked if x[2] == period] or [x for x in recent if x[2] == period]
            chosen += sorted(options, key=lambda o: salted("progress_recent", pid, o))[:1]
    for activity, unit, period in chosen:

        def lately(r: ToolResult, a: str = activity, u: str = unit, q: str = period) -> tuple[str, str]:
            rows = [x["quantity"] for x in r.data["by_activity"] if x["activity"] == a]
            k = rows[0] if rows else 0
            return (f"From {r.data['start']} to {r.data['end']} ({PERIODS[q]}) project {pid} reported {number(k)} {u} "
                    f"of {words(a)} {_cite([pid])}.", number(k))  # fmt: skip

        yield Ask("progress_recent", pid, {"activity": ACTIVITY_PHRASES.get(activity, words(activity)),
                                           "period": PERIODS[period]}, "progress",
                  {"project_id": pid, "period": period, "activity": activity}, "numeric", lately, unit,
                  {"abs": 0.05, "rel": 0.0})  # fmt: skip
    yield from _pole_records(conn, pid, pick)


def _pole_records(conn: psycopg.Connection, pid: str, pick: Callable[[str, list[Any]], list[Any]]) -> Iterator[Ask]:
    """Record questions (RAFT): the pole's record among three distractors of the same project (the search's default
    k is 4), in the search's
    output shape, in an order that does not give the answer away."""
    # filtered on the view's own columns too: its other branches are pruned, not rendered (a timeout at 1M rows)
    poles = conn.execute("SELECT o.pole_number, c.record_id, c.content, o.status FROM poles o JOIN fibreflow_corpus c"
                         " ON c.record_id = 'pole:' || o.id WHERE o.project_id = %(p)s AND c.project_id = %(p)s"
                         " AND c.record_type = 'pole'", {"p": pid}).fetchall()  # fmt: skip
    by_number = {row[0]: row for row in poles}
    for number_ in pick("pole_record", sorted(by_number)):
        right = by_number[number_]
        others = sorted((r for r in poles if r[0] != number_), key=lambda r: salted("distractor", number_, r[0]))[:3]
        shown = sorted([right, *others], key=lambda r: salted("order", number_, r[0]))
        records = [{"record_id": r[1], "record_type": "pole", "project_id": pid, "content": r[2]} for r in shown]
        args = {"query": f"pole {number_}", "project_id": pid, "record_type": "pole"}

        def answer(r: ToolResult, row: Any = right) -> tuple[str, str]:
            return f"Pole {row[0]} on project {pid} is {words(row[3])} [{row[1]}].", words(row[3])

        yield Ask("pole_record", pid, {"pole": number_}, "search_records", args, "contains", answer,
                  result={"records": records})  # fmt: skip


def tool_call(tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A call as the training conversations write it (the arguments' JSON spelt the same, token for token)."""
    return {"id": "call_0", "type": "function", "function": {"name": tool, "arguments": json.dumps(arguments)}}


def conversation(system: str, question: str, tool: str, arguments: dict[str, Any], result: ToolResult,
                 answer: str, error: tuple[dict[str, Any], str] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The question, the call, its result, the answer; with `error` (wrong arguments, the tool's message), first
    the wrong call (weight 0: context, not learned) and the error, as the loop sends it back."""
    wrong = [] if error is None else [
        {"role": "assistant", "content": None, "tool_calls": [tool_call(tool, error[0])], "weight": 0},
        {"role": "tool", "tool_call_id": "call_0", "content": ERROR + error[1]},
    ]  # fmt: skip
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        *wrong,
        {"role": "assistant", "content": None, "tool_calls": [tool_call(tool, arguments)]},
        {"role": "tool", "tool_call_id": "call_0", "content": result.content()},
        {"role": "assistant", "content": answer},
    ]


def grounded(conn: psycopg.Connection, cfg: AssistantConfig, system: str, project: dict[str, Any], split: str,
             typos: bool, nth: int = 0) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:  # fmt: skip
    """(training row, test rows) of every grounded question about `project` in `split`. A phrasing that names
    the project only by its name gets a call with the name, unless the tools do not resolve that name to this
    project (at scale, names repeat): then only phrasings with the id are used. A family's questions about one
    project take its phrasings in turn, from a salted start: no two alike while phrasings are left. In training,
    `cfg.recoveries` of them (of MISTAKES' families, different families first) are asked once more, in the
    next phrasing, with a wrong first call and the tool's error before the right call; and every one is asked
    `cfg.call_drills` more times, in the next phrasings, up to its call only; and `cfg.made_up_projects`
    of them (different families first) are asked once more about a made-up project (`made_up_project`), in a
    phrasing with {name} only, up to the call. `nth`: the project's place among its split's projects (training takes
    the fixed lists' values in turn across them: project_asks)."""
    try:
        by_id_only = resolve_project(conn, canonical_project(project["name"]))["id"] != project["id"]
    except ToolError:
        by_id_only = True
    pid = project["id"]
    turn: Counter[str] = Counter()
    asks = list(project_asks(conn, project, cfg, nth if split == "train" else None))
    train = split == "train"
    redo = set(spread(asks, [i for i, a in enumerate(asks) if a.family in MISTAKES], "recover", pid)[: cfg.recoveries])
    drills = cfg.call_drills if train else 0
    places = cfg.made_up_projects.places if cfg.made_up_projects else []
    named = cfg.made_up_projects.per_project if train and cfg.made_up_projects else 0
    nameable = [i for i, a in enumerate(asks) if any(_name_only(t) for t in cfg.questions[a.family].train)]
    renamed = set(spread(asks, nameable, "made-up-project", pid)[:named])
    for i, ask in enumerate(asks):
        modes = ("", *(["recover"] if train and i in redo else []), *(f"drill{k}" for k in range(drills)),
                 *(["named"] if i in renamed else []))  # fmt: skip
        for mode in modes:
            recover = mode == "recover"
            templates = getattr(cfg.questions[ask.family], split)
            key = salted(ask.family, pid, i, split, *([mode] if mode else []))
            name = project["name"]
            if mode == "named":
                templates, name = [t for t in templates if _name_only(t)], made_up_project(conn, places, key)
            elif by_id_only:
                templates = [t for t in templates if "{pid}" in t] or templates
            start = int(salted(ask.family, pid, split)[:8], 16)
            template = templates[(start + turn[ask.family]) % len(templates)]
            turn[ask.family] += 1
            question = template.format(pid=pid, name=name, **ask.slots)
            arguments = ask.arguments | ({} if "{pid}" in template else {"project_id": name})
            if typos and mode != "named" and int(key[8:16], 16) % 1000 < cfg.typo_share * 1000:
                question = typo(question, key[16:], " ".join([name, *ask.slots.values()]))
            rid = f"asst-{ask.family}-{pid}-{i}" + (f"-{mode}" if mode else "")
            call = json.dumps({"name": ask.tool, "arguments": arguments})
            if mode.startswith("drill") or mode == "named":  # learned up to the call: no result, no answer
                messages = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": None, "tool_calls": [tool_call(ask.tool, arguments)]},
                ]
                yield {"id": rid, "family": "name_drill" if mode == "named" else "drill", "project_id": pid,
                       "question": question, "answer": call, "tools": True, "messages": messages}, []  # fmt: skip
                continue
            if ask.result is not None:
                ids = [r["record_id"] for r in ask.result["records"]]
                result = ToolResult(ask.tool, arguments, ask.result, ids)
            else:
                result = run_tool(conn, ask.tool, arguments)
            error = None
            if recover:
                wrong = MISTAKES[ask.family](arguments, int(key[:8], 16))
                try:
                    run_tool(conn, ask.tool, wrong)
                except ToolError as exc:
                    error = (wrong, str(exc))
                else:
                    raise DatasetBuildError(f"the mistaken call {wrong} of {ask.family} is not refused by its tool")
            answer, reference = ask.answer(result)
            messages = conversation(system, question, ask.tool, arguments, result, answer, error)
            row = {"id": rid, "family": "recovery" if recover else ask.family, "project_id": pid,
                   "question": question, "answer": answer, "tools": True, "messages": messages}  # fmt: skip
            tags = ["assistant", ask.family, pid]
            tests = [
                {"id": f"{rid}-call", "question": question, "reference": call, "kind": "tool_call", "tools": True,
                 "contexts": [], "tags": [*tags, "tool_call"]},
                {"id": f"{rid}-answer", "question": question, "reference": reference, "kind": ask.kind,
                 "tools": True, "contexts": [], "unit": ask.unit, "tolerance": ask.tolerance,
                 "tags": [*tags, "grounded"]},
            ]  # fmt: skip
            yield row, tests


def spread(asks: list[Ask], indices: list[int], *salt: Any) -> list[int]:
    """`indices` of `asks` in a salted order, different families first."""
    ranked: list[tuple[int, int]] = []  # (its family's asks before it, ask)
    before: Counter[str] = Counter()
    for i in sorted(indices, key=lambda i: salted(*salt, i)):
        ranked.append((before[asks[i].family], i))
        before[asks[i].family] += 1
    return [i for _, i in sorted(ranked, key=lambda r: r[0])]


def _name_only(template: str) -> bool:
    return "{name}" in template and "{pid}" not in template


def made_up_project(conn: psycopg.Connection, places: list[str], key: str) -> str:
    """A made-up project's name, picked by `key`, that the tools resolve to no project: one of `places` that no
    project's name holds (a test project's place never in training), in lower case one time in four (people type
    names so)."""
    taken = " ".join(n for (n,) in conn.execute("SELECT lower(name) FROM projects"))
    places = [p for p in places if p.lower() not in taken]
    k = int(key[:16], 16)
    for j in range(len(places)):
        name = (f"{places[(k + j) % len(places)]} {AREAS[k // 7 % len(AREAS)]} {('FTTH', 'FTTB')[k // 3 % 2]}"
                f" Phase {1 + k // 5 % 4}")  # fmt: skip
        name = name.lower() if k // 11 % 4 == 0 else name
        try:
            resolve_project(conn, canonical_project(name))
        except ToolError:
            return name
    raise DatasetBuildError("made_up_projects: every place is in a project's name (or like one); add places")


def made_up_terms(cfg: MadeUp, known: set[str]) -> dict[str, list[str]]:
    """Deterministic made-up terms, none a glossary term, split train/test without overlap."""
    combos = [f"{a}{b} {n}" for a, b, n in itertools.product(cfg.prefixes, cfg.suffixes, cfg.nouns)]
    terms = [t for t in sorted(combos, key=lambda t: salted("made-up", t)) if t.lower() not in known]
    if len(terms) < cfg.train + cfg.test:
        raise ValueError(f"made_up: only {len(terms)} terms can be made, {cfg.train + cfg.test} asked for")
    return {"train": terms[: cfg.train], "test": terms[cfg.train : cfg.train + cfg.test]}


def refusals(conn: psycopg.Connection, cfg: AssistantConfig, refusal_answer: str, system: str, known: set[str],
             templates: dict[str, list[str]], held_out: set[str]
             ) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:  # fmt: skip
    """(split, training row, test row) of made-up terms and unanswerable questions, asked with the tools offered:
    the answer is the refusal, no call. And refusal recoveries (train only, the first `cfg.refusal_recoveries`
    made-up terms asked again in the next phrasing): a first call that takes the term for a project (weight 0:
    context, not learned), the tool's own error, then the refusal: a model that calls where it should not still
    ends in "I don't know" instead of calling again to the loop's last turn. The error's closest projects leave
    out the `held_out` ones (no test project in training)."""
    terms = made_up_terms(cfg.made_up, known)
    for i, t in enumerate(terms["train"][: cfg.refusal_recoveries]):
        question = templates["train"][(i + 1) % len(templates["train"])].format(term=t)
        tool, answer = TERM_MISTAKES[i % len(TERM_MISTAKES)], refusal_answer.format(term=t)
        try:
            run_tool(conn, tool, {"project_id": t})
        except ToolError as exc:
            head, sep, listed = str(exc).partition("; closest projects: ")
            kept = [p for p in re.split(r", (?=PRJ-)", listed) if sep and p.split(" ", 1)[0] not in held_out]
            error = head + sep + ", ".join(kept) if kept else head
        else:
            raise DatasetBuildError(f"the made-up term {t!r} names a project: {tool} does not refuse it")
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [tool_call(tool, {"project_id": t})], "weight": 0},
            {"role": "tool", "tool_call_id": "call_0", "content": ERROR + error},
            {"role": "assistant", "content": answer},
        ]
        row = {"id": f"made-up-train-{i:03d}-recover", "family": "refusal_recovery", "project_id": None,
               "question": question, "answer": answer, "tools": True, "messages": messages}  # fmt: skip
        yield "train", row, {}
    for split in ("train", "test"):
        asked = [
            (
                f"made-up-{split}-{i:03d}",
                templates[split][i % len(templates[split])].format(term=t),
                refusal_answer.format(term=t),
                "made_up_term",
            )
            for i, t in enumerate(terms[split])
        ]
        asked += [(f"unanswerable-{split}-{i:03d}", q, cfg.unanswerable.answer, "unanswerable")
                  for i, q in enumerate(getattr(cfg.unanswerable, split))]  # fmt: skip
        for rid, question, answer, tag in asked:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question},
                        {"role": "assistant", "content": answer}]  # fmt: skip
            row = {"id": rid, "family": tag, "project_id": None, "question": question, "answer": answer,
                   "tools": True, "messages": messages}  # fmt: skip
            test = {"id": rid, "question": question, "reference": answer, "kind": "open", "tools": True,
                    "contexts": [], "tags": ["assistant", tag]}  # fmt: skip
            yield split, row, test
