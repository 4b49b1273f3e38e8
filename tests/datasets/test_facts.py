"""The health rating a project's facts give: pure-function tests on handwritten facts."""

from __future__ import annotations

from typing import Any

import pytest
from fibreflow.datasets.facts import health


def facts(**kw: Any) -> dict[str, Any]:
    """A project on schedule: 40 of 100 tasks done, 90 days to its target, field progress steady."""
    tasks = kw.pop("tasks", {"done": 40, "in_progress": 20, "todo": 40})
    base = {"project": {"status": "in_progress"}, "days_to_target": 90, "tasks_by_status": tasks,
            "tasks_done_share": round(tasks.get("done", 0) / max(1, sum(tasks.values())), 3), "overdue_tasks": 0,
            "progress_last_7_days": 120.0, "progress_previous_7_days": 100.0}  # fmt: skip
    return base | kw


@pytest.mark.parametrize(
    ("changes", "rating", "reasons"),
    [
        ({}, "green", ["40% of tasks done, 90 days to the target end date, no blocked or overdue tasks"]),
        ({"tasks": {"done": 12}, "days_to_target": -30}, "green", ["all tasks are done"]),
        ({"days_to_target": -5}, "red", ["5 days past the target end date with 60 tasks open"]),
        ({"overdue_tasks": 16}, "red", ["16 of 60 open tasks are overdue"]),
        ({"overdue_tasks": 15}, "amber", ["15 overdue tasks"]),  # a quarter of the open tasks: not yet red
        ({"tasks": {"done": 40, "blocked": 3, "todo": 57}}, "amber", ["3 blocked tasks"]),
        (
            {"progress_last_7_days": 49.0},
            "amber",
            ["field progress fell to 49 in the last 7 days from 100 the 7 days before"],
        ),
        ({"progress_last_7_days": 0.0, "progress_previous_7_days": 0.0}, "green", None),  # no work either week
        ({"days_to_target": 20}, "amber", ["20 days to the target end date with 40% of tasks done"]),
        (
            {"days_to_target": -2, "overdue_tasks": 3, "tasks": {"done": 40, "blocked": 1, "todo": 59}},
            "red",
            ["2 days past the target end date with 60 tasks open", "3 overdue tasks", "1 blocked task"],
        ),
    ],
)
def test_the_rating_follows_the_rule_and_says_why(changes: dict[str, Any], rating: str, reasons: Any) -> None:
    got = health(facts(**changes))
    assert got["rating"] == rating
    assert reasons is None or got["reasons"] == reasons
