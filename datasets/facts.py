"""The facts a project summary or health check rests on, computed in SQL as of the data's date (never "now"):
the project, its tasks by status, blocked and overdue tasks, field progress this week and last, poles by status;
and the health rating those facts give (green, amber or red, with its reasons), by rule rather than by a model."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg


def project_facts(conn: psycopg.Connection, project_id: str) -> dict[str, Any] | None:
    """The numbers a summary or health check rests on, computed in SQL (as of the data's date)."""
    as_of = conn.execute(
        "SELECT coalesce((SELECT (value->>'as_of')::date FROM fibreflow_meta WHERE key = 'data_source'), current_date)"
    ).fetchone()[0]
    p = conn.execute(
        "SELECT id, name, client, region, town, network_type, build_method, status, project_manager, start_date,"
        " target_end_date, homes_planned, budget_zar FROM projects WHERE id = %s",
        (project_id,),
    ).fetchone()
    if p is None:
        return None
    keys = (
        "id",
        "name",
        "client",
        "region",
        "town",
        "network_type",
        "build_method",
        "status",
        "project_manager",
        "start_date",
        "target_end_date",
        "homes_planned",
        "budget_zar",
    )
    project = dict(zip(keys, p, strict=True))
    tasks = dict(
        conn.execute(
            "SELECT status, count(*) FROM tasks WHERE project_id = %s GROUP BY status", (project_id,)
        ).fetchall()
    )
    blocked = [
        r[0]
        for r in conn.execute(
            "SELECT title FROM tasks WHERE project_id = %s AND status = 'blocked' ORDER BY due_date LIMIT 5",
            (project_id,),
        )
    ]
    overdue = conn.execute(
        "SELECT count(*) FROM tasks WHERE project_id = %s AND status <> 'done' AND due_date < %s", (project_id, as_of)
    ).fetchone()[0]
    week = conn.execute(
        "SELECT coalesce(sum(quantity) FILTER (WHERE report_date > %s - 7), 0),"
        " coalesce(sum(quantity) FILTER (WHERE report_date <= %s - 7 AND report_date > %s - 14), 0)"
        " FROM daily_progress WHERE project_id = %s AND report_date <= %s",
        (as_of, as_of, as_of, project_id, as_of),
    ).fetchone()
    activity = conn.execute(
        "SELECT activity, unit, sum(quantity) FROM daily_progress WHERE project_id = %s AND report_date <= %s"
        " GROUP BY activity, unit ORDER BY activity",
        (project_id, as_of),
    ).fetchall()
    poles = dict(
        conn.execute(
            "SELECT status, count(*) FROM poles WHERE project_id = %s GROUP BY status", (project_id,)
        ).fetchall()
    )
    done = tasks.get("done", 0)
    return {
        "as_of": as_of.isoformat(),
        "project": {
            k: (v.isoformat() if isinstance(v, dt.date) else float(v) if k == "budget_zar" else v)
            for k, v in project.items()
        },
        "days_to_target": (project["target_end_date"] - as_of).days,
        "tasks_by_status": tasks,
        "tasks_done_share": round(done / max(1, sum(tasks.values())), 3),
        "blocked_tasks": blocked,
        "overdue_tasks": overdue,
        "progress_last_7_days": float(week[0]),
        "progress_previous_7_days": float(week[1]),
        "progress_to_date": {f"{a} ({u})": float(q) for a, u, q in activity},
        "poles_by_status": poles,
    }


def health(facts: dict[str, Any]) -> dict[str, Any]:
    """Green, amber or red, and why: red when the project is past its target end date with work open, or when more
    than a quarter of its open tasks are overdue; amber when any task is blocked or overdue, when field progress in
    the last 7 days fell below half of the 7 days before, or when the target is under 30 days away with less than
    80% of the tasks done; else green."""
    tasks = facts["tasks_by_status"]
    open_ = sum(n for s, n in tasks.items() if s != "done")
    days, done, overdue = facts["days_to_target"], facts["tasks_done_share"], facts["overdue_tasks"]
    if tasks and not open_:
        return {"rating": "green", "reasons": ["all tasks are done"]}
    red, amber = [], []
    if days < 0 and open_:
        red.append(f"{-days} days past the target end date with {open_} tasks open")
    if open_ and overdue > open_ / 4:
        red.append(f"{overdue} of {open_} open tasks are overdue")
    elif overdue:
        amber.append(f"{overdue} overdue task{'s' * (overdue != 1)}")
    if tasks.get("blocked"):
        amber.append(f"{tasks['blocked']} blocked task{'s' * (tasks['blocked'] != 1)}")
    last, before = facts["progress_last_7_days"], facts["progress_previous_7_days"]
    if before > 0 and last < before / 2:
        amber.append(f"field progress fell to {last:g} in the last 7 days from {before:g} the 7 days before")
    if 0 <= days < 30 and done < 0.8:
        amber.append(f"{days} days to the target end date with {done:.0%} of tasks done")
    if red or amber:
        return {"rating": "red" if red else "amber", "reasons": red + amber}
    return {"rating": "green", "reasons": [f"{done:.0%} of tasks done, {days} days to the target end date, no "
                                           "blocked or overdue tasks"]}  # fmt: skip
