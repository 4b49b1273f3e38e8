"""FibreFlow's tools against the real embedded Postgres (the small demo seed): each answers what an independent
query says, bad arguments and injection strings get a ToolError the model can read and change nothing, the
transaction is read-only, and a slow query is stopped by the statement timeout."""

from __future__ import annotations

import datetime as dt
import difflib
import re
from typing import Any

import psycopg
import pytest
from fibreflow.datasets import tools
from fibreflow.datasets.tools import TOOLS, Tool, ToolError, run_tool

pytestmark = pytest.mark.integration


@pytest.fixture
def conn(seeded_url: str) -> Any:
    with psycopg.connect(seeded_url, autocommit=True) as c:
        yield c


def first_project(conn: Any) -> str:
    return conn.execute("SELECT id FROM projects ORDER BY id LIMIT 1").fetchone()[0]


def test_every_tool_has_an_openai_schema() -> None:
    for tool in TOOLS.values():
        s = tool.schema()
        assert s["type"] == "function" and s["function"]["name"] == tool.name and s["function"]["description"]
        params = s["function"]["parameters"]
        assert params["type"] == "object" and ("project_id" in params["required"]) != tool.searches
    progress = TOOLS["progress"].schema()["function"]["parameters"]
    assert {"format": "date", "type": "string"} in progress["properties"]["start"]["anyOf"]
    assert "last_week" in progress["properties"]["period"]["anyOf"][0]["enum"]


def test_the_tools_answer_what_the_records_say(conn: Any) -> None:
    p = first_project(conn)
    status = run_tool(conn, "project_status", {"project_id": p.lower().replace("prj-000", "prj-")})  # prj-1 style
    assert status.arguments["project_id"] == p and status.record_ids == [p]
    want_tasks = dict(conn.execute("SELECT status, count(*) FROM tasks WHERE project_id = %s GROUP BY 1", (p,)))
    assert status.data["tasks_by_status"] == want_tasks and status.data["project"]["id"] == p
    as_of = conn.execute("SELECT value->>'as_of' FROM fibreflow_meta WHERE key = 'data_source'").fetchone()[0]
    assert status.data["as_of"] == as_of  # the data's date, for "last week" (never today)
    poles = run_tool(conn, "pole_counts", {"project_id": p})
    want_poles = dict(conn.execute("SELECT status, count(*) FROM poles WHERE project_id = %s GROUP BY 1", (p,)))
    assert poles.data["poles_by_status"] == want_poles and poles.data["total"] == sum(want_poles.values())
    pending = run_tool(conn, "pole_counts", {"project_id": p, "status": "permission_pending"})
    assert pending.data["total"] == want_poles.get("permission_pending", 0)
    boq = run_tool(conn, "boq_totals", {"project_id": p})
    money = conn.execute("SELECT round(sum(quantity * rate_zar), 2) FROM boq_items WHERE project_id = %s",
                         (p,)).fetchone()[0]  # fmt: skip
    assert boq.data["total_zar"] == pytest.approx(float(money))
    civil = run_tool(conn, "boq_totals", {"project_id": p, "category": "CIV"})
    assert set(civil.data["by_category"]) == {"CIV"} and set(civil.data["by_category"]["CIV"]["quantities"]) <= {
        "m",
        "each",
        "m²",
    }
    assert civil.data["total_zar"] == boq.data["by_category"]["CIV"]["amount_zar"]
    for loose, code in (("civil works", "CIV"), ("Splicing", "SPL"), ("cable", "CAB"), ("home connections", "CON")):
        assert run_tool(conn, "boq_totals", {"project_id": p, "category": loose}).arguments["category"] == code
    end = conn.execute("SELECT max(report_date) FROM daily_progress WHERE project_id = %s", (p,)).fetchone()[0]
    start = end - dt.timedelta(days=6)
    week = run_tool(conn, "progress", {"project_id": p, "start": str(start), "end": str(end)})
    want = dict(conn.execute("SELECT activity, sum(quantity) FROM daily_progress WHERE project_id = %s AND"
                             " report_date BETWEEN %s AND %s GROUP BY 1", (p, start, end)))  # fmt: skip
    assert {r["activity"]: r["quantity"] for r in week.data["by_activity"]} == {k: float(v) for k, v in want.items()}
    planted = run_tool(conn, "progress", {"project_id": p, "start": str(start), "end": str(end),
                                          "activity": "poles planted"})  # fmt: skip
    assert planted.arguments["activity"] == "pole_planting"
    assert [r["activity"] for r in planted.data["by_activity"]] == ["pole_planting"]
    before = dt.date.fromisoformat("2000-01-01")  # an activity asked for a span without work: its zero, in its unit
    unit = conn.execute("SELECT min(unit) FROM daily_progress WHERE project_id = %s AND activity = 'pole_planting'",
                        (p,)).fetchone()[0]  # fmt: skip
    none = run_tool(
        conn, "progress", {"project_id": p, "start": str(before), "end": str(before), "activity": "planting"}
    )
    assert none.data["by_activity"] == [{"activity": "pole_planting", "unit": unit, "quantity": 0.0, "days": 0}]
    blocked = run_tool(conn, "task_status", {"project_id": p, "status": "blocked"})
    assert blocked.data["count"] == want_tasks.get("blocked", 0)
    assert all(r["status"] == "blocked" for r in blocked.data["tasks"])
    for loose, status in (("still dressed", "dressed"), ("still waiting for permission", "permission_pending"),
                          ("Permission Granted", "permission_granted"), ("rejected poles", "rejected"),
                          ("still_planting", "planted"), ("planning", "planned")):  # fmt: skip
        assert run_tool(conn, "pole_counts", {"project_id": p, "status": loose}).arguments["status"] == status
    for loose, status in (("finished", "done"), ("Blocked tasks", "blocked"), ("in progress", "in_progress")):
        assert run_tool(conn, "task_status", {"project_id": p, "status": loose}).arguments["status"] == status
    with pytest.raises(ToolError, match="'permission' is not a pole status; one of: planned, permission_pending"):
        run_tool(conn, "pole_counts", {"project_id": p, "status": "permission"})  # pending or granted: not a guess
    everything = run_tool(conn, "task_status", {"project_id": p})
    assert everything.data["count"] == sum(want_tasks.values()) > tools.LIST_LIMIT  # counted in SQL, all of them
    assert len(everything.data["tasks"]) == len(everything.record_ids) == tools.LIST_LIMIT  # shown: the first five
    assert [f"task:{r['id']}" for r in everything.data["tasks"]] == everything.record_ids


def test_a_project_is_named_by_its_id_or_its_name(conn: Any) -> None:
    pid, name = conn.execute("SELECT id, name FROM projects ORDER BY id LIMIT 1").fetchone()
    by_id = run_tool(conn, "boq_totals", {"project_id": pid})
    for ref in (name, name.upper(), f"  {name.lower()} "):
        by_name = run_tool(conn, "boq_totals", {"project_id": ref})
        assert by_name.data == by_id.data and by_name.data["project_id"] == pid and by_name.record_ids == [pid]
    assert run_tool(conn, "project_status", {"project_id": name}).data["project"]["id"] == pid
    others = conn.execute("SELECT count(*) FROM projects WHERE name ILIKE %s", (f"%{name.split()[0]}%",)).fetchone()
    if others[0] == 1:  # a unique part of the name is enough
        assert run_tool(conn, "pole_counts", {"project_id": name.split()[0]}).data["project_id"] == pid
    slip = name[0] + name[2] + name[1] + name[3:]  # two letters swapped, as a model copying the name may do
    assert run_tool(conn, "boq_totals", {"project_id": slip}).data == by_id.data
    other = re.sub(r"\d+", lambda m: str(int(m.group()) + 7), name)  # another phase is not a misspelling
    with pytest.raises(ToolError, match=f"no project {re.escape(other.lower())};"):
        run_tool(conn, "boq_totals", {"project_id": other})
    with pytest.raises(ToolError, match=r"'ftth' names more than one project: PRJ-\d{4} \(.+\), PRJ-"):
        run_tool(conn, "project_status", {"project_id": "FTTH"})
    names = [r[0] for r in conn.execute("SELECT name FROM projects ORDER BY id")]
    closest = max(names, key=lambda n: difflib.SequenceMatcher(None, "nowhere park", n.casefold()).ratio())
    with pytest.raises(ToolError, match=rf"no project nowhere park; closest projects: PRJ-\d+ \({closest}\)"):
        run_tool(conn, "project_status", {"project_id": "Nowhere Park"})


def test_a_misspelt_name_resolves_among_thousands_of_projects(conn: Any) -> None:
    """The misspelt-name match and the closest projects an error lists look at every project, not the first
    ROW_LIMIT rows a tool's query returns."""
    columns = [r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name ="
                                          " 'projects' AND column_name NOT IN ('id', 'name')")]  # fmt: skip
    cols = ", ".join(columns)
    conn.execute(f"INSERT INTO projects (id, name, {cols}) SELECT 'PRJ-' || (1000 + i), 'Gravel Ridge Estate ' || i,"
                 f" {cols} FROM projects, generate_series(1, 400) AS i WHERE id = 'PRJ-0001'")  # fmt: skip
    assert conn.execute("SELECT count(*) FROM projects").fetchone()[0] > tools.ROW_LIMIT + 200
    got = run_tool(conn, "project_status", {"project_id": "Gravle Ridge Estate 399"})
    assert got.data["project"]["id"] == "PRJ-1399" and got.record_ids == ["PRJ-1399"]
    with pytest.raises(ToolError, match=r"no project gravel ridge estate 999; closest projects: PRJ-1099 "):
        run_tool(conn, "project_status", {"project_id": "Gravel Ridge Estate 999"})


def test_the_most_alike_are_what_sorting_every_candidate_gives() -> None:
    """The pruned search (candidates scored in the order of difflib's upper bound, stopping below the k-th best)
    against scoring and sorting all: the same candidates, scores and order, ties included (short words of few
    letters tie often)."""
    import random

    rng = random.Random(0)
    for trial in range(300):
        words = ["".join(rng.choice("abcde ") for _ in range(rng.randint(0, 9))) for _ in range(rng.randint(0, 40))]
        ref = "".join(rng.choice("abcde ") for _ in range(rng.randint(0, 9)))
        everything = sorted(
            ((difflib.SequenceMatcher(None, ref, w).ratio(), i) for i, w in enumerate(words)), key=lambda x: -x[0]
        )
        k = 1 + trial % 6
        assert tools.most_alike(ref, [(w, i) for i, w in enumerate(words)], k) == everything[:k], (ref, words, k)


def test_a_name_two_projects_share_is_an_error_not_the_first_of_them(conn: Any) -> None:
    """At scale, names repeat: a shared name lists the projects that bear it instead of answering for one."""
    (a, name), (b, _) = conn.execute("SELECT id, name FROM projects ORDER BY id LIMIT 2").fetchall()
    conn.execute("UPDATE projects SET name = %s WHERE id = %s", (name, b))
    with pytest.raises(ToolError, match=rf"names more than one project: {a} \(.+\), {b} \(.+\); use its id"):
        run_tool(conn, "boq_totals", {"project_id": name})
    assert run_tool(conn, "boq_totals", {"project_id": b}).data["project_id"] == b


def test_relative_periods_are_dates_as_of_the_datas_date(conn: Any) -> None:
    """Periods end on the data's date (fibreflow_meta's as_of), never today; weeks start on Monday."""
    saturday = dt.date(2026, 10, 31)
    want = {"today": ("2026-10-31", "2026-10-31"), "yesterday": ("2026-10-30", "2026-10-30"),
            "this_week": ("2026-10-26", "2026-10-31"), "last_week": ("2026-10-19", "2026-10-25"),
            "this_month": ("2026-10-01", "2026-10-31"), "last_month": ("2026-09-01", "2026-09-30"),
            "last_7_days": ("2026-10-25", "2026-10-31"), "last_30_days": ("2026-10-02", "2026-10-31")}  # fmt: skip
    assert {k: tuple(map(str, tools.period_dates(k, saturday))) for k in want} == want
    assert tools.period_dates("last_month", dt.date(2026, 1, 15)) == (dt.date(2025, 12, 1), dt.date(2025, 12, 31))
    p = conn.execute("SELECT project_id FROM daily_progress ORDER BY report_date DESC LIMIT 1").fetchone()[0]
    as_of = conn.execute("SELECT value->>'as_of' FROM fibreflow_meta WHERE key = 'data_source'").fetchone()[0]
    recent = run_tool(conn, "progress", {"project_id": p, "period": "last 30 days"})  # as a model may write it
    assert recent.arguments["period"] == "last_30_days" and recent.data["as_of"] == recent.data["end"] == as_of
    explicit = run_tool(conn, "progress", {"project_id": p, "start": recent.data["start"], "end": as_of})
    assert recent.data["by_activity"] == explicit.data["by_activity"] != []


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("project_status", {"project_id": "PRJ-9999"}, "no project PRJ-9999; closest projects: PRJ-0001"),
        ("project_status", {"project_id": "PRJ-0001'; DROP TABLE projects; --"}, "is not a project id"),
        ("project_status", {"project_id": "x%' OR '1'='1"}, "no project x%' or '1'='1; closest projects"),
        ("project_status", {"project_id": "1; SELECT 1"}, "is not a project id like PRJ-0003 or a project's name"),
        ("pole_counts", {"project_id": "Park_FTTH"}, "no project park_ftth;"),  # _ is no LIKE wildcard
        ("progress", {"project_id": "PRJ-0001", "period": "last_week", "start": "2026-03-01"}, "either a period or"),
        ("progress", {"project_id": "PRJ-0001"}, "give start and end"),
        ("progress", {"project_id": "PRJ-0001", "period": "last_decade"}, "period"),
        ("pole_counts", {"project_id": "PRJ-0001", "status": "lost"}, "status"),
        ("progress", {"project_id": "PRJ-0001", "start": "2026-03-10", "end": "2026-03-01"}, "is before start"),
        ("progress", {"project_id": "PRJ-0001", "start": "last week", "end": "2026-03-01"}, "start"),
        ("boq_totals", {"project_id": "PRJ-0001", "category": "X' OR 1=1 --"}, "category"),
        ("boq_totals", {"project_id": "PRJ-0001", "category": "catering"}, "not a BOQ category; one of: CIV, AER"),
        (
            "progress",
            {"project_id": "PRJ-0001", "start": "2026-03-01", "end": "2026-03-10", "activity": "painting"},
            "no activity 'painting' on PRJ-0001; its activities: ",
        ),
        ("task_status", {"project_id": "PRJ-0001", "limit": 5}, "limit: Extra inputs are not permitted"),
        ("pole_count", {"project_id": "PRJ-0001"}, "no tool 'pole_count'; the tools are: project_status"),
    ],
)
def test_bad_arguments_get_a_tool_error_and_change_nothing(conn: Any, name: str, arguments: dict, message: str) -> None:
    before = conn.execute("SELECT count(*) FROM projects").fetchone()[0]
    with pytest.raises(ToolError, match=message.replace("(", r"\(")):
        run_tool(conn, name, arguments)
    assert conn.execute("SELECT count(*) FROM projects").fetchone()[0] == before


def test_tools_run_read_only_and_within_the_statement_timeout(conn: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in tools for a slow query and a tool that writes: the timeout stops the first with a ToolError, the
    read-only transaction refuses the second and nothing changes."""
    slow = Tool("slow", "sleeps", tools.ProjectArgs, lambda c, a: (tools._rows(c, "SELECT pg_sleep(2)", {}), []))

    def delete(c: Any, a: Any) -> tuple[dict[str, Any], list[str]]:
        c.execute("DELETE FROM projects WHERE id = %s", (a.project_id,))
        return {}, []

    writes = Tool("writes", "deletes", tools.ProjectArgs, delete)
    monkeypatch.setitem(TOOLS, "slow", slow)
    monkeypatch.setitem(TOOLS, "writes", writes)
    with pytest.raises(ToolError, match="took longer than 100 ms"):
        run_tool(conn, "slow", {"project_id": "PRJ-0001"}, timeout_ms=100)
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        run_tool(conn, "writes", {"project_id": "PRJ-0001"})
    assert conn.execute("SELECT count(*) FROM projects WHERE id = 'PRJ-0001'").fetchone()[0] == 1


@pytest.fixture
def retriever(embedder: Any) -> Any:
    from fibreflow.datasets.embed import load_embed_config
    from fibreflow.datasets.retrieval import Retriever

    return Retriever(embedder, load_embed_config().table)


def test_the_record_search_finds_records_within_its_filters(embedded_url: str, retriever: Any) -> None:
    with psycopg.connect(embedded_url, autocommit=True) as c:
        p = first_project(c)
        task = c.execute("SELECT id, title FROM tasks WHERE project_id = %s ORDER BY id LIMIT 1", (p,)).fetchone()
        found = run_tool(c, "search_records", {"query": task[1], "project_id": p.lower(), "record_type": "task"},
                         retriever=retriever)  # fmt: skip
        assert found.arguments["project_id"] == p
        assert f"task:{task[0]}" in found.record_ids[:3]  # its own title finds it
        assert {r["record_type"] for r in found.data["records"]} == {"task"}
        assert {r["project_id"] for r in found.data["records"]} == {p}
        assert found.record_ids == [r["record_id"] for r in found.data["records"]]
        dated = run_tool(c, "search_records", {"query": "trenching", "record_type": "daily_progress",
                                               "date_from": "2000-01-01", "date_to": "2100-01-01"},
                         retriever=retriever)  # fmt: skip
        assert len(dated.record_ids) == 4 and all(i.startswith("daily_progress:") for i in dated.record_ids)  # k 4
        for arguments, message in (
            ({"query": "poles", "date_from": "1990-01-01", "date_to": "1990-01-31"}, "no records match"),
            ({"query": "poles", "project_id": "PRJ-0999"}, "no project PRJ-0999"),
            ({"query": "poles", "date_from": "2026-03-10", "date_to": "2026-03-01"}, "is before date_from"),
            ({"query": "x" * 301}, "query"),
            ({"query": "poles", "k": 50}, "k"),
            ({"query": "'; DROP TABLE record_embeddings; --", "record_type": "pole; DELETE"}, "record_type"),
        ):
            with pytest.raises(ToolError, match=message):
                run_tool(c, "search_records", arguments, retriever=retriever)
        pole, pole_id = c.execute("SELECT pole_number, 'pole:' || id FROM poles WHERE project_id = %s ORDER BY id"
                                  " OFFSET 7 LIMIT 1", (p,)).fetchone()  # fmt: skip
        named = run_tool(c, "search_records", {"query": f"status of pole {pole}", "project_id": p}, retriever=retriever)
        assert named.record_ids == [pole_id]  # an identifier is found by its text: just its record
        injected = run_tool(c, "search_records", {"query": "'; DROP TABLE record_embeddings; --"},
                            retriever=retriever)  # fmt: skip
        assert injected.record_ids  # a query is only ever a bound parameter: it is searched for, nothing else
        assert c.execute("SELECT count(*) FROM record_embeddings").fetchone()[0] > 0
    with psycopg.connect(embedded_url, autocommit=True) as c, pytest.raises(ToolError, match="not available here"):
        run_tool(c, "search_records", {"query": "poles"})  # no embeddings index configured
