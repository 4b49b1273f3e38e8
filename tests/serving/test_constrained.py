"""Constrained decoding on the local model server: a forced tool call (tool_choice "required" or named) and a JSON
response_format come back as promised, whatever the model would have written, through the openai SDK (streamed
and not); a grammar that cannot be built is a 400, and one that fails mid-answer ends its own request only."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from fibreflow.datasets.tools import TOOLS
from toolchat import ANSWER, PLAIN_ANSWER, PLAIN_QUESTION, QUESTION, answered, asked, tools

NAMED = {"type": "function", "function": {"name": "search_records"}}
REPLY = {"type": "object", "additionalProperties": False, "required": ["answer", "confident"],
         "properties": {"answer": {"type": "string", "maxLength": 30}, "confident": {"type": "boolean"}}}  # fmt: skip


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def calls_of(url: str, stream: bool, **kw: Any) -> tuple[list[tuple[str, str]], str | None, str]:
    """([(name, arguments)], finish reason, content) of one answer, streamed or not."""
    kw = {"model": "tiny", "tools": tools(), "temperature": 0, "max_tokens": 120} | kw
    if not stream:
        choice = client(url).chat.completions.create(**kw).choices[0]
        found = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return found, choice.finish_reason, choice.message.content or ""
    by_index: dict[int, list[str]] = {}
    finish, content = None, ""
    for chunk in client(url).chat.completions.create(stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            name, args = by_index.setdefault(tc.index, ["", ""])
            by_index[tc.index] = [name + (tc.function.name or ""), args + (tc.function.arguments or "")]
        finish = choice.finish_reason or finish
    return [(n, a) for n, a in by_index.values()], finish, content


def valid_call(name: str, arguments: str) -> None:
    """The call names an offered tool and its arguments pass that tool's own validation."""
    assert name in TOOLS, name
    TOOLS[name].args.model_validate(json.loads(arguments))


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_gets_arguments_valid_for_it(tool_upstream: str, stream: bool) -> None:
    """The pole question under a forced search_records: unconstrained, the model writes pole_counts' arguments
    (no `query`) after the forced name; constrained, the arguments are search_records'."""
    found, finish, content = calls_of(tool_upstream, stream, messages=asked(QUESTION), tool_choice=NAMED)
    assert finish == "tool_calls" and content == "" and [n for n, _ in found] == ["search_records"]
    valid_call(*found[0])


@pytest.mark.integration
@pytest.mark.parametrize("stream", [False, True])
def test_required_where_the_model_answers_in_words_still_gets_a_valid_call(tool_upstream: str, stream: bool) -> None:
    """Once the tool's result is in, the model answers in words; tool_choice "required" makes it a call."""
    free, finish, content = calls_of(tool_upstream, stream, messages=answered())
    assert (free, finish, content) == ([], "stop", ANSWER)  # left to itself, no call
    found, finish, content = calls_of(tool_upstream, stream, messages=answered(), tool_choice="required")
    assert finish == "tool_calls" and content == "" and found
    for call in found:
        valid_call(*call)


@pytest.mark.integration
def test_json_response_formats(tool_upstream: str) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "reply", "schema": REPLY}}
    out = client(tool_upstream).chat.completions.create(
        model="tiny", messages=asked(PLAIN_QUESTION), response_format=schema, temperature=0, max_tokens=60
    )
    reply = json.loads(out.choices[0].message.content or "")
    assert set(reply) == {"answer", "confident"} and isinstance(reply["confident"], bool)
    assert isinstance(reply["answer"], str) and len(reply["answer"]) <= 30
    any_object = client(tool_upstream).chat.completions.create(
        model="tiny", messages=asked(PLAIN_QUESTION), response_format={"type": "json_object"}, max_tokens=60,
        temperature=0,
    )  # fmt: skip
    assert any_object.choices[0].finish_reason == "stop"  # left free, this model answers in words
    assert isinstance(json.loads(any_object.choices[0].message.content or ""), dict)


@pytest.mark.integration
def test_a_grammar_that_cannot_be_built_is_a_400_naming_the_field(tool_upstream: str) -> None:
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}
    cases = [
        ({"tools": [bad_tool], "tool_choice": "required"}, "tools", "/nowhere"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
         "response_format.json_schema", "objec"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema", "schema"),
    ]  # fmt: skip
    for change, param, said in cases:
        body = {"model": "tiny", "messages": asked(PLAIN_QUESTION), "max_tokens": 8} | change
        r = httpx.post(f"{tool_upstream}/v1/chat/completions", json=body)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param and said in error["message"], r.text
    out = client(tool_upstream).chat.completions.create(model="tiny", messages=asked(PLAIN_QUESTION), temperature=0)
    assert out.choices[0].message.content == PLAIN_ANSWER


@pytest.mark.integration
def test_constrained_and_free_requests_share_a_batch_without_touching_each_other(tool_upstream: str) -> None:
    def free() -> str | None:
        out = client(tool_upstream).chat.completions.create(model="tiny", messages=asked(PLAIN_QUESTION),
                                                             temperature=0)  # fmt: skip
        return out.choices[0].message.content

    def forced() -> list[tuple[str, str]]:
        return calls_of(tool_upstream, False, messages=answered(), tool_choice="required")[0]

    with ThreadPoolExecutor(6) as pool:
        frees = [pool.submit(free) for _ in range(3)]
        forceds = [pool.submit(forced) for _ in range(3)]
        assert [f.result() for f in frees] == [PLAIN_ANSWER] * 3
        answers = [f.result() for f in forceds]
    assert answers[0] and answers == [answers[0]] * 3  # greedy: the same call every time, batched or not


def test_a_grammar_failing_mid_answer_ends_its_own_row_only(tool_engine: Any) -> None:
    from fibreflow.serving.engine import EngineError, Sampling
    from fibreflow.serving.grammar import tool_calls_grammar

    plain = tool_engine.chat_ids(asked(PLAIN_QUESTION))
    broken = tool_engine.constraint(tool_calls_grammar(tools()))
    assert not broken.matcher.consume_token(tool_engine.tok.eos_token_id)  # EOS before any call: refused, stuck

    async def both() -> tuple[Any, Any]:
        good = tool_engine.complete("tiny", plain, 32, Sampling())
        bad = tool_engine.complete("tiny", plain, 32, Sampling(temperature=0.7), constraint=broken)
        return tuple(await asyncio.gather(good, bad, return_exceptions=True))

    good, bad = asyncio.run(both())
    assert isinstance(bad, EngineError) and "constrained generation failed" in str(bad)
    assert good[0] == PLAIN_ANSWER and good[1].reason == "stop"
