"""The tool loop (datasets/agent.py) as a Python function: the tiny model trained to call tools (tests/toolchat.py)
behind the model server, FibreFlow's tools on the seeded records; the bound on rounds."""

from __future__ import annotations

import json
import re
from typing import Any

import openai
import psycopg
import pytest
from fibreflow.datasets.agent import NO_ANSWER, WITHHELD, Loop, ask, openai_complete
from fibreflow.datasets.tools import run_tool, schemas
from toolchat import ARGS, QUESTION, SYSTEM

pytestmark = pytest.mark.integration


def test_the_python_function_runs_the_loop_against_a_model_server(tool_upstream: str, seeded_url: str) -> None:
    client = openai.OpenAI(base_url=f"{tool_upstream}/v1", api_key="none", max_retries=0)
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        projects = [r[0] for r in conn.execute("SELECT id FROM projects")]
        loop = ask(QUESTION, openai_complete(client, "tiny", max_tokens=64), lambda n, a: run_tool(conn, n, a),
                   system=SYSTEM, max_steps=2)  # fmt: skip
        # asked with tool_choice "none" at once, the model still writes a call; the server returns it as text
        silent = ask(QUESTION, openai_complete(client, "tiny", max_tokens=64), lambda n, a: run_tool(conn, n, a),
                     system=SYSTEM, max_steps=0)  # fmt: skip
    assert silent.said == "" and silent.answer == NO_ANSWER and not silent.answered  # no markup for the caller
    assert loop.done and isinstance(loop.answer, str) and 1 <= loop.rounds <= 2
    first = loop.calls[0]
    assert first.name == "pole_counts" and (first.arguments == ARGS or first.error)
    assert (first.record_ids == ["PRJ-0003"]) == ("PRJ-0003" in projects)
    assert loop.messages[2]["tool_calls"][0]["function"]["name"] == "pole_counts"  # the conversation it ran
    assert loop.messages[3]["role"] == "tool"


def test_every_loop_ends_with_an_answer_within_max_steps(seeded_url: str) -> None:
    """A model that would call tools forever: after max_steps rounds the turn is asked with tool_choice "none" and
    whatever it says is the answer. Malformed arguments and unknown tools come back to it as errors."""
    choices: list[str] = []

    def call(i: int, name: str, arguments: str) -> dict[str, Any]:
        return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": arguments}}

    script = [
        {"tool_calls": [call(1, "pole_counts", "{oops")]},
        {"tool_calls": [call(2, "drop_table", "{}")]},
        {"tool_calls": [call(3, "project_status", json.dumps({"project_id": "prj-1"}))]},
        {"content": "PRJ-0001 is in progress.", "tool_calls": [call(4, "project_status", "{}")]},
    ]

    def complete(messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: str) -> dict[str, Any]:
        choices.append(tool_choice)
        assert tools == schemas()
        return script[len(choices) - 1]

    with psycopg.connect(seeded_url, autocommit=True) as conn:
        loop = ask("status?", complete, lambda n, a: run_tool(conn, n, a), system=SYSTEM, max_steps=3)
    assert choices == ["auto", "auto", "auto", "none"] and loop.rounds == 3
    assert loop.answer == "PRJ-0001 is in progress."  # the last turn's text, its calls not run
    errors = [c.error for c in loop.calls]
    assert errors[0] == "pole_counts: the arguments are not a JSON object"
    assert errors[1].startswith("no tool 'drop_table'") and errors[2] is None
    assert loop.calls[2].arguments == {"project_id": "PRJ-0001"} and loop.record_ids == ["PRJ-0001"]
    # the trace keeps what the model wrote beside what ran
    assert [c["written"] for c in loop.json()["tool_calls"]] == ["{oops", "{}", '{"project_id": "prj-1"}']
    tool_turns = [m["content"] for m in loop.messages if m["role"] == "tool"]
    assert tool_turns[0].startswith("error: ") and json.loads(tool_turns[2])["project"]["id"] == "PRJ-0001"
    assert Loop.start(SYSTEM, "q").tool_choice == "auto"
    assert loop.answered and loop.json()["answered"] is True


def test_a_loop_whose_model_says_nothing_answers_i_dont_know() -> None:
    """A last turn that is only a tool call (or empty): the answer is NO_ANSWER, never "", and says so."""
    from fibreflow.eval.scorers import admits_not_knowing

    def never_run(name: str, arguments: dict[str, Any]) -> Any:
        raise AssertionError("no tool runs after the last round")

    written = '<tool_call>{"name": "project_status", "arguments": {"project_id": "PRJ-0003"}}</tool_call>'
    lasts = [{"content": None, "tool_calls": [{"id": "c", "type": "function", "function":
              {"name": "project_status", "arguments": "{}"}}]}, {"content": "  "},
             {"content": written}, {"content": written.replace("}}<", "<")}]  # fmt: skip
    for last in lasts:  # the last two: a call written as text, as a server parses none for tool_choice "none"
        loop = Loop.start(SYSTEM, "What is a Lumvane tension spool?", max_steps=0)
        loop.take(last, never_run)
        assert loop.done and loop.answer == NO_ANSWER and not loop.answered and admits_not_knowing(loop.answer)
        assert loop.json()["answered"] is False and loop.calls == []


def test_an_answer_with_a_number_the_records_did_not_give_is_withheld(seeded_url: str) -> None:
    """After a call, every number the caller gets is in a tool result or the question; an answer with one from
    nowhere becomes WITHHELD ("I don't know"), its numbers named, the model's text kept for the evaluation only.
    An answer without a call is the model's own knowledge and passes."""
    from fibreflow.eval.scorers import admits_not_knowing

    question = "How many poles does {pid} have, counting the last 7 days?"
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        pid = conn.execute("SELECT id FROM projects ORDER BY id LIMIT 1").fetchone()[0]

        def answer(text: str) -> Loop:
            said = iter([{"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "pole_counts",
                          "arguments": json.dumps({"project_id": pid})}}]}, {"content": text}])  # fmt: skip
            return ask(question.format(pid=pid), lambda m, t, c: next(said), lambda n, a: run_tool(conn, n, a),
                       system=SYSTEM)  # fmt: skip

        total = json.loads(answer("").messages[3]["content"])["total"]
        assert total > 0
        for grounded in (f"{pid} has {total:,} poles [{pid}].", f"{total} poles over 7 days.", "No count, sorry."):
            loop = answer(grounded)
            assert loop.answered and loop.answer == grounded and loop.unsupported == [], grounded
        invented = f"{pid} has {total + 1} poles, {total} of them planted in 2025 [{pid}]."
        loop = answer(invented)
        assert not loop.answered and loop.answer == WITHHELD and admits_not_knowing(loop.answer)
        assert loop.unsupported == [total + 1, 2025] and loop.said == invented
        out = loop.json()
        assert out["unsupported_numbers"] == [total + 1, 2025] and invented not in json.dumps(out)
        assert out["tool_calls"][0]["record_ids"] == [pid]  # what the records said is still there

    plain = Loop.start(SYSTEM, "What is a PON splitter?")
    plain.take({"content": "A passive device that splits one fibre 1:32."}, lambda n, a: None)  # type: ignore[arg-type,return-value]
    assert plain.answered and plain.answer.endswith("1:32.")  # no call: nothing to hold it to


def test_a_tool_error_grounds_no_number(seeded_url: str) -> None:
    """A tool's error is not data: an answer made up after one (a count beside the error's list of closest
    projects) is withheld, though the error's text holds the number."""
    question = "How many poles are planned on Nowhere Park?"
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        said = iter([{"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "pole_counts",
                      "arguments": json.dumps({"project_id": "Nowhere Park"})}}]}, None])  # fmt: skip
        error = ""

        def reply(messages: Any, tools: Any, choice: Any) -> dict[str, Any]:
            nonlocal error
            turn = next(said)
            if turn is not None:
                return turn
            error = messages[-1]["content"]
            number = re.findall(r"Phase (\d+)", error)[0]  # a number only the error holds
            return {"content": f"Nowhere Park has {number} planned poles."}

        loop = ask(question, reply, lambda n, a: run_tool(conn, n, a), system=SYSTEM)
    assert error.startswith("error: no project nowhere park; closest projects: PRJ-")
    assert not loop.answered and loop.answer == WITHHELD and loop.unsupported != []
