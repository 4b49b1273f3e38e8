"""Test questions asked through the tool loop (datasets/agent.py), as `/v1/fibreflow/ask` asks them: every loop
advanced a round at a time, each round one batched generation; FibreFlow's tools run on the evaluation's database.

Each sample's answer: for a `tool_call` sample the model's first call (`{"name", "arguments"}` as JSON), else the
loop's final answer. `numbers_grounded` checks that every number in an answer to a data question is in what the
tools returned (or in the question): a number from nowhere is an invented one. It is asked of the answer the caller
got (the loop withholds an answer with such a number after a tool call; one without a call passes) and of the
model's own text (`said`). `contexts_of` is what a judge (RAGAS faithfulness) holds the answer to: the tool results
the model read.
"""

from __future__ import annotations

import json
from typing import Any

from fibreflow.core.chat import parse_tool_calls
from fibreflow.core.numbers import unsupported
from fibreflow.datasets.agent import Loop
from fibreflow.eval.config import ToolLoop
from fibreflow.eval.generators import Generator
from fibreflow.eval.testset import Sample


def ask_all(
    gen: Generator, questions: list[str], system: str, cfg: ToolLoop, database_url: str | None
) -> dict[str, Loop]:
    """question -> its finished loop."""
    from fibreflow.core.db import connect, load_db_config
    from fibreflow.core.db import database_url as configured_url
    from fibreflow.datasets.tools import run_tool, schemas

    loops = {q: Loop.start(system, q, cfg.max_steps) for q in dict.fromkeys(questions)}
    db = load_db_config()
    with connect(database_url or configured_url(db), timeout_s=db.connect_timeout_s) as conn:
        search = _Search()

        def run(name: str, arguments: dict[str, Any]) -> Any:
            return run_tool(conn, name, arguments, retriever=search.retriever() if name == "search_records" else None)

        while pending := [loop for loop in loops.values() if not loop.done]:
            for choice in ("auto", "none"):
                group = [loop for loop in pending if loop.tool_choice == choice]
                if not group:
                    continue
                texts = gen.generate(
                    [loop.messages for loop in group], schemas() if choice == "auto" else None, cfg.max_new_tokens
                )
                for loop, text in zip(group, texts, strict=True):
                    content, calls = parse_tool_calls(text)
                    loop.take({"content": content, "tool_calls": [c.openai() for c in calls]}, run)
    return loops


class _Search:
    """The record search's retriever, made on first use (the embedding model loads only if a search happens)."""

    def __init__(self) -> None:
        self._retriever: Any = None

    def retriever(self) -> Any:
        if self._retriever is None:
            from fibreflow.datasets.embed import embedder_for, load_embed_config
            from fibreflow.datasets.retrieval import Retriever

            cfg = load_embed_config()
            self._retriever = Retriever(embedder_for(cfg), cfg.table, cfg.ef_search)
        return self._retriever


def answer_all(
    gen: Generator,
    conversations: list[list[dict[str, Any]]],
    samples: list[Sample],
    system: str,
    cfg: ToolLoop,
    database_url: str | None = None,
) -> tuple[list[str], dict[int, Loop]]:
    """Every sample's answer: asked plainly (its conversation), or through the tool loop (`tools: true`); and the
    loop of each of those, by index. One way for the offline evaluation and the live regression runs."""
    looped = [i for i, s in enumerate(samples) if s.tools]
    plain = [i for i in range(len(samples)) if not samples[i].tools]
    answers = [""] * len(samples)
    for i, text in zip(plain, gen.generate([conversations[i] for i in plain]) if plain else [], strict=True):
        answers[i] = text
    loops: dict[int, Loop] = {}
    if looped:
        by_question = ask_all(gen, [samples[i].question for i in looped], system, cfg, database_url)
        for i in looped:
            loops[i] = by_question[samples[i].question]
            answers[i] = answer_of(samples[i], loops[i])
    return answers, loops


def answer_of(sample: Sample, loop: Loop) -> str:
    """What the model said: its first call for a `tool_call` sample, else its answer; "" where it said nothing (the
    loop's NO_ANSWER is the platform's, not the model's: it earns no refusal)."""
    if sample.kind == "tool_call" and loop.calls:
        first = loop.calls[0]
        return json.dumps({"name": first.name, "arguments": first.arguments})
    return (loop.answer or "") if loop.answered else ""


def contexts_of(loop: Loop) -> list[str]:
    """The tool results the model read before answering (its retrieved contexts), in order."""
    return [m["content"] for m in loop.messages if m["role"] == "tool" and m["content"]]


def numbers_grounded(loop: Loop, text: str | None = None) -> float:
    """1.0 when every number in the loop's answer (or `text`) is in a tool's result or the question, else 0.0."""
    return float(not unsupported((loop.answer or "") if text is None else text, loop.sources))
