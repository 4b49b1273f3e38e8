"""Tool calls through the local model server (and the router in front of it), with the openai SDK: a model that
really generates `<tool_call>` text (tests/toolchat.py) comes back as OpenAI `tool_calls`, streamed and not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from fibreflow.serving.model_server import ToolCallStream
from toolchat import ANSWER, ARGS, PLAIN_ANSWER, PLAIN_QUESTION, answered, asked, tools


@pytest.fixture
def tool_server(tool_upstream: str) -> str:
    return tool_upstream


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def streamed(url: str, **kw: Any) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """(content, tool calls by index with their id/name/arguments joined, finish reason) of a streamed answer."""
    content, calls, finish = "", {}, None
    for chunk in client(url).chat.completions.create(**{"model": "tiny", "stream": True, "temperature": 0} | kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += tc.id or ""
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.integration
def test_a_tool_call_comes_back_as_openai_tool_calls(tool_server: str) -> None:
    out = client(tool_server).chat.completions.create(model="tiny", messages=asked(), tools=tools(), temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "pole_counts" and json.loads(call.function.arguments) == ARGS


@pytest.mark.integration
def test_a_streamed_tool_call_arrives_whole_and_no_tag_leaks_as_content(tool_server: str) -> None:
    content, calls, finish = streamed(tool_server, messages=asked(), tools=tools())
    assert finish == "tool_calls" and content == ""
    assert calls[0]["name"] == "pole_counts" and json.loads(calls[0]["arguments"]) == ARGS and calls[0]["id"]


@pytest.mark.integration
def test_the_tools_result_turn_gets_the_answer(tool_server: str) -> None:
    out = client(tool_server).chat.completions.create(model="tiny", messages=answered(), tools=tools(), temperature=0)
    assert out.choices[0].message.content == ANSWER and out.choices[0].finish_reason == "stop"
    assert not out.choices[0].message.tool_calls
    content, calls, finish = streamed(tool_server, messages=answered(), tools=tools())
    assert (content, calls, finish) == (ANSWER, {}, "stop")


@pytest.mark.integration
def test_tool_choice_none_and_named(tool_server: str) -> None:
    none = client(tool_server).chat.completions.create(
        model="tiny", messages=asked(), tools=tools(), tool_choice="none", temperature=0, max_tokens=16
    )
    assert none.choices[0].finish_reason != "tool_calls" and not none.choices[0].message.tool_calls
    named = {"type": "function", "function": {"name": "pole_counts"}}
    forced = client(tool_server).chat.completions.create(
        model="tiny", messages=asked(), tools=tools(), tool_choice=named, temperature=0
    )
    assert forced.choices[0].message.tool_calls[0].function.name == "pole_counts"
    assert json.loads(forced.choices[0].message.tool_calls[0].function.arguments) == ARGS
    required = client(tool_server).chat.completions.create(
        model="tiny", messages=asked(), tools=tools(), tool_choice="required", temperature=0
    )
    assert json.loads(required.choices[0].message.tool_calls[0].function.arguments) == ARGS


@pytest.mark.integration
def test_the_router_passes_tool_calls_through_unchanged(tool_server: str, run_app: Any, project_tmp: Path) -> None:
    from fibreflow.serving.router import create_app
    from serving_helpers import tool_config

    router = run_app(create_app(tool_config(tool_server), redis_url="", watch=False))
    direct = client(tool_server).chat.completions.create(model="tiny", messages=asked(), tools=tools(), temperature=0)
    for _ in range(2):  # the second answer comes from the router's cache
        via = client(router).chat.completions.create(model="assistant", messages=asked(), tools=tools(), temperature=0)
        assert via.choices[0].finish_reason == "tool_calls"
        assert via.choices[0].message.tool_calls[0].function == direct.choices[0].message.tool_calls[0].function
    content, calls, finish = streamed(router, model="assistant", messages=asked(), tools=tools())
    assert finish == "tool_calls" and json.loads(calls[0]["arguments"]) == ARGS and content == ""
    answer = client(router).chat.completions.create(
        model="assistant", messages=answered(), tools=tools(), temperature=0
    )
    assert answer.choices[0].message.content == ANSWER


@pytest.mark.integration
def test_without_tools_a_plain_question_gets_a_plain_answer(tool_server: str) -> None:
    out = client(tool_server).chat.completions.create(model="tiny", messages=asked(PLAIN_QUESTION), temperature=0)
    assert out.choices[0].message.content == PLAIN_ANSWER


def test_the_stream_splitter_on_text_that_only_looks_like_a_call() -> None:
    s = ToolCallStream()
    pieces = [s.step(t, None)[0].get("content", "") for t in ("a <", "tool", " b", "<tool_call>{oops")]
    assert "".join(pieces) == "a <tool b"
    delta, finish = s.step("", "stop")
    assert (delta, finish) == ({"content": "<tool_call>{oops"}, "stop")  # never a call: it leaves as content


@pytest.mark.integration
def test_langchain_binds_the_tools_and_calls_them_through_the_router(
    tool_upstream: str, run_app: Any, project_tmp: Path
) -> None:
    from fibreflow.datasets.tools import schemas
    from fibreflow.serving.router import create_app
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI
    from serving_helpers import tool_config
    from toolchat import QUESTION, SYSTEM

    router = run_app(create_app(tool_config(tool_upstream), redis_url="", watch=False))
    llm = ChatOpenAI(base_url=f"{router}/v1", api_key="none", model="assistant", temperature=0, max_retries=0)
    agent = llm.bind_tools(schemas())
    reply = agent.invoke([SystemMessage(SYSTEM), HumanMessage(QUESTION)])
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "pole_counts"
    assert reply.tool_calls[0]["args"] == ARGS and reply.tool_calls[0]["id"].startswith("call_")
    streamed = None
    for chunk in agent.stream([SystemMessage(SYSTEM), HumanMessage(QUESTION)]):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.tool_calls[0]["args"] == ARGS


@pytest.mark.integration
def test_a_llama3_model_calls_the_tools_in_the_hermes_format(llama3_tool_llama: Path, run_app: Any) -> None:
    """A model whose chat template has no tool format (Meta-Llama-3-Instruct's), trained on chats rendered through
    the Hermes prelude: its calls come back as OpenAI tool_calls (streamed and not), a forced call follows the
    named tool's schema, and the tool's result gets the answer."""
    from fibreflow.datasets.tools import TOOLS
    from fibreflow.serving.engine import Engine
    from fibreflow.serving.model_server import create_model_app
    from fibreflow.training.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama3_tool_llama).eval()
    engine = Engine(model, load_tokenizer(str(llama3_tool_llama)), base_name="tiny", max_context=1024)
    try:
        url = run_app(create_model_app(engine, default_max_tokens=64))
        out = client(url).chat.completions.create(model="tiny", messages=asked(), tools=tools(), temperature=0)
        (call,) = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "pole_counts"
        assert json.loads(call.function.arguments) == ARGS
        content, calls, finish = streamed(url, messages=asked(), tools=tools())
        assert finish == "tool_calls" and content == "" and json.loads(calls[0]["arguments"]) == ARGS
        named = {"type": "function", "function": {"name": "search_records"}}
        forced = client(url).chat.completions.create(
            model="tiny", messages=asked(), tools=tools(), tool_choice=named, temperature=0, max_tokens=120
        )
        (call,) = forced.choices[0].message.tool_calls
        TOOLS["search_records"].args.model_validate(json.loads(call.function.arguments))
        answer = client(url).chat.completions.create(model="tiny", messages=answered(), tools=tools(), temperature=0)
        assert answer.choices[0].message.content == ANSWER and answer.choices[0].finish_reason == "stop"
    finally:
        engine.close()
