"""The assistant's tool loop: the model decides which question is asked (a tool call and its arguments), the
records answer it in SQL (datasets/tools.py), and the model says the answer in words. At most `max_steps` rounds
of tool calls; the turn after the last round is asked with tool_choice "none", so every loop ends with an answer.
A last turn with no text (a small model may call a tool even then) is answered `NO_ANSWER`, marked `answered: false`:
the caller gets "I don't know", never an empty answer, and never a call's markup (with tool_choice "none" a server
parses no calls: one the model writes anyway comes back as text, and only the text before it is an answer).
An answer after tool calls with a number that neither a tool result nor the question holds (`core/numbers.py`: ids
and dates are not numbers) is not passed on either: a figure the records did not give is one the model made up.
The caller gets `WITHHELD` ("I don't know"), `answered: false` and the numbers in `unsupported_numbers`; the model's
text stays in `said` for the evaluation, never in the response. An answer without a call is the model's own
knowledge (a glossary definition may hold "1:32") and passes.

`Loop` is the one state machine behind every caller: `ask()` below (any OpenAI-compatible chat callable, e.g. an
`openai.OpenAI` client on the router), the router's `POST /v1/fibreflow/ask` (async, through its own dispatch) and
the evaluation (many loops advanced a round at a time, each round one batched generation).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fibreflow.core.chat import CALL_START
from fibreflow.core.numbers import unsupported
from fibreflow.datasets.tools import ToolError, ToolResult, schemas

Complete = Callable[[list[dict[str, Any]], list[dict[str, Any]], str], dict[str, Any]]  # (messages, tools,
# tool_choice) -> the assistant message (OpenAI shape: content, tool_calls)
RunTool = Callable[[str, dict[str, Any]], ToolResult]
NO_ANSWER = "I don't know: FibreFlow's records gave me no answer to that."
ERROR = "error: "  # how a tool's error reads to the model
WITHHELD = "I don't know: the records I looked up do not hold the figures my answer had, so I will not guess."


@dataclass(frozen=True)
class Called:
    """One tool call the model made: what it asked, what the records said (ids), or why they could not."""

    name: str
    arguments: dict[str, Any] | str  # as normalised by the tool (PRJ-0003), or the model's text if not JSON
    record_ids: list[str]
    error: str | None = None
    written: str = ""  # the arguments as the model wrote them (what it left out, what it spelled its own way)

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments, "written": self.written,
                "record_ids": self.record_ids, "error": self.error}  # fmt: skip


@dataclass
class Loop:
    messages: list[dict[str, Any]]
    max_steps: int = 3
    calls: list[Called] = field(default_factory=list)
    rounds: int = 0
    answer: str | None = None
    answered: bool = False  # the answer is the model's text, not NO_ANSWER or WITHHELD
    said: str = ""  # the model's last text, passed on or not
    unsupported: list[float] = field(default_factory=list)  # the numbers that got its text withheld

    @classmethod
    def start(cls, system: str, question: str, max_steps: int = 3) -> Loop:
        return cls([{"role": "system", "content": system}, {"role": "user", "content": question}], max_steps)

    @property
    def done(self) -> bool:
        return self.answer is not None

    @property
    def tool_choice(self) -> str:
        """ "auto" while rounds are left, then "none": the model must answer."""
        return "auto" if self.rounds < self.max_steps else "none"

    @property
    def sources(self) -> list[str]:
        """What an answer's numbers may come from: the question and every tool result; not a tool's error (its
        closest projects' names and the like are no data)."""
        return [m["content"] for m in self.messages if m["role"] in ("user", "tool") and m["content"]
                and not (m["role"] == "tool" and m["content"].startswith(ERROR))]  # fmt: skip

    @property
    def record_ids(self) -> list[str]:
        """Every record the tools answered from, first seen first."""
        return list(dict.fromkeys(i for c in self.calls for i in c.record_ids))

    def take(self, reply: dict[str, Any], run: RunTool) -> None:
        """The model's turn: its tool calls are run (an error becomes the tool's answer, for the model to read), or
        its content is the answer (NO_ANSWER where it has none, WITHHELD where it has a number from nowhere)."""
        calls = reply.get("tool_calls") or []
        if not calls or self.rounds >= self.max_steps:
            self.said = (reply.get("content") or "").split(CALL_START)[0]
            self.unsupported = unsupported(self.said, self.sources) if self.calls else []
            self.answered = bool(self.said.strip()) and not self.unsupported
            self.answer = self.said if self.answered else WITHHELD if self.unsupported else NO_ANSWER
            return
        self.rounds += 1
        self.messages.append({"role": "assistant", "content": reply.get("content"), "tool_calls": calls})
        for call in calls:
            fn = call["function"]
            called, content = _run(fn["name"], fn.get("arguments") or "{}", run)
            self.calls.append(called)
            self.messages.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": content})

    def json(self) -> dict[str, Any]:
        return {"answer": self.answer, "answered": self.answered, "tool_calls": [c.json() for c in self.calls],
                "record_ids": self.record_ids, "steps": self.rounds,
                "unsupported_numbers": self.unsupported}  # fmt: skip


def _run(name: str, arguments: str, run: RunTool) -> tuple[Called, str]:
    try:
        args = json.loads(arguments)
        if not isinstance(args, dict):
            raise ValueError
    except ValueError:
        error = f"{name}: the arguments are not a JSON object"
        return Called(name, arguments, [], error, written=arguments), ERROR + error
    try:
        result = run(name, args)
    except ToolError as exc:
        return Called(name, args, [], str(exc), written=arguments), ERROR + str(exc)
    return Called(name, result.arguments, result.record_ids, written=arguments), result.content()


def ask(question: str, complete: Complete, run: RunTool, *, system: str, max_steps: int = 3) -> Loop:
    """One question through the loop: `complete` is the model, `run` the tools (e.g. `run_tool` on a connection)."""
    loop, tools = Loop.start(system, question, max_steps), schemas()
    while not loop.done:
        loop.take(complete(loop.messages, tools, loop.tool_choice), run)
    return loop


def openai_complete(client: Any, model: str, **params: Any) -> Complete:
    """`complete` over an `openai.OpenAI` client (the router, vLLM, the model server): greedy unless `params` say
    otherwise."""

    def complete(messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: str) -> dict[str, Any]:
        out = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice=tool_choice,
                                             **({"temperature": 0} | params))  # fmt: skip
        return out.choices[0].message.model_dump(exclude_none=True)

    return complete
