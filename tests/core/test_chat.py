"""Chat rendering with tools (core/chat.py) on the bundled model's real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fibreflow.core.chat import ChatFormatError, chat_ids, held_back, parse_tool_calls, template_for
from toolchat import ARGS, QUESTION, RESULT, answered, asked, call_turn, tools
from transformers import AutoTokenizer

PLAIN = [
    [{"role": "user", "content": "What is a BOQ?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
     {"role": "user", "content": "and PRJ-0003?"}],
]  # fmt: skip


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.mark.parametrize("messages", PLAIN)
def test_plain_chats_render_exactly_as_the_models_own_template(tok: Any, messages: list[dict[str, Any]]) -> None:
    """What was trained before tools existed, and what clients without tools send, is unchanged."""
    assert template_for(tok) is not None  # ChatML without a tool format: ours is used
    for gen in (True, False):
        own = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)
        assert chat_ids(tok, messages, generation_prompt=gen) == list(own["input_ids"])


def test_tools_calls_and_results_render_in_the_hermes_format(tok: Any) -> None:
    text = tok.decode(chat_ids(tok, answered(), tools()))
    system = text.split("<|im_end|>")[0]
    assert (
        "- pole_counts(project_id, status?)" in system
        and "- progress(project_id, start?, end?, period?, activity?)" in system
    )
    call = (
        '<|im_start|>assistant\n<tool_call>{"name": "pole_counts", "arguments": ' + json.dumps(ARGS) + "}</tool_call>"
    )
    assert call + "<|im_end|>" in text
    assert f"<|im_start|>tool\n{json.dumps(RESULT)}<|im_end|>\n<|im_start|>assistant\n" in text
    assert text.index(QUESTION) < text.index(call)
    # without tools offered the system turn has no tool lines; the conversation is a prefix of its continuation
    assert "Tools" not in tok.decode(chat_ids(tok, asked()))
    whole = chat_ids(tok, [*asked(), call_turn()], tools(), generation_prompt=False)
    assert whole[: len(chat_ids(tok, asked(), tools()))] == chat_ids(tok, asked(), tools())


def test_a_template_without_any_tool_format_refuses_tools(tok: Any) -> None:
    plain = AutoTokenizer.from_pretrained(tok.name_or_path)
    plain.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    assert template_for(plain) is None
    assert chat_ids(plain, [{"role": "user", "content": "hi"}], generation_prompt=False)  # plain chats still work
    with pytest.raises(ChatFormatError, match="no tool format"):
        chat_ids(plain, asked(), tools())


def test_parsing_answers_into_tool_calls() -> None:
    two = (
        'Let me look. <tool_call>{"name": "pole_counts", "arguments": {"project_id": "PRJ-0003"}}</tool_call>'
        '<tool_call>{"name": "boq_totals", "arguments": {}}'
    )
    content, calls = parse_tool_calls(two)
    assert content == "Let me look. " and [c.name for c in calls] == ["pole_counts", "boq_totals"]
    assert json.loads(calls[0].arguments) == {"project_id": "PRJ-0003"} and calls[1].arguments == "{}"
    assert parse_tool_calls("14 poles.") == ("14 poles.", [])
    for broken in (
        '<tool_call>{"name": "x", "arguments": ',
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>["pole_counts"]</tool_call>',
        '<tool_call>{"name": "x", "arguments": "a"}</tool_call>',
    ):
        assert parse_tool_calls(broken) == (broken, [])  # not a call: the text is the answer


def test_streamed_content_holds_back_what_may_become_a_tag() -> None:
    assert held_back("14 poles") == 8
    assert held_back("14 <tool") == 3 and held_back("14 <") == 3
    assert held_back('x<tool_call>{"name"') == 1
    assert held_back("a < b") == 5  # a "<" followed by something else is content
