"""Chat rendering with tools (core/chat.py) on the bundled model's real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fibreflow.core.chat import CALL_START, ChatFormatError, chat_ids, held_back, parse_tool_calls, template_for
from toolchat import ARGS, LLAMA3, QUESTION, RESULT, answered, asked, call_turn, tools
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


# Mistral-7B-Instruct-v0.2's: user and assistant turns only, strictly alternating
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def with_template(tok: Any, template: str) -> Any:
    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    other.chat_template = template
    return other


@pytest.mark.parametrize("messages", PLAIN)
def test_a_template_without_hermes_calls_renders_plain_chats_as_before(
    tok: Any, messages: list[dict[str, Any]]
) -> None:
    llama = with_template(tok, LLAMA3)
    assert template_for(llama) is not None
    for gen in (True, False):
        own = llama.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)
        assert chat_ids(llama, messages, generation_prompt=gen) == list(own["input_ids"])


def test_llama3_renders_tools_calls_and_results_in_the_hermes_format_in_its_own_turns(tok: Any) -> None:
    llama = with_template(tok, LLAMA3)
    second = {"role": "tool", "tool_call_id": "call_2", "content": '{"total": 3}'}
    text = llama.decode(chat_ids(llama, [*answered(), second], tools()))
    head = "<|start_header_id|>system<|end_header_id|>\n\n"
    system = text[text.index(head) + len(head) : text.index("<|eot_id|>")]
    assert system.startswith(asked()[0]["content"] + "\n\nTools (? = optional; call as <tool_call>{json}</tool_call>):")
    assert "\n- pole_counts(project_id, status?)\n" in system and system.endswith("k?)")
    call = '<tool_call>{"name": "pole_counts", "arguments": ' + json.dumps(ARGS) + "}</tool_call>"
    assert f"<|start_header_id|>assistant<|end_header_id|>\n\n{call}<|eot_id|>" in text
    results = f"<tool_response>\n{json.dumps(RESULT)}\n</tool_response>\n<tool_response>\n" + '{"total": 3}'
    assert f"<|start_header_id|>user<|end_header_id|>\n\n{results}\n</tool_response><|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "tool<|end_header_id|>" not in text  # no turn in a role the template does not know
    # no system turn of the user's: the tool lines get one of their own
    alone = llama.decode(chat_ids(llama, asked()[1:], tools()))
    assert alone.count("<|start_header_id|>system") == 1 and f"{head}Tools (" in alone
    # the generated call parses back
    assert parse_tool_calls(call)[1][0].name == "pole_counts"


def test_a_template_writing_hermes_calls_itself_is_used_as_it_is(tok: Any) -> None:
    hermes = with_template(tok, "{% for m in messages %}{{ m.content }}{% endfor %}{# calls: " + CALL_START + " #}")
    assert template_for(hermes) is None


def test_a_template_that_refuses_the_rewritten_turns_says_so(tok: Any) -> None:
    mistral = with_template(tok, MISTRAL)
    assert chat_ids(mistral, asked()[1:], generation_prompt=False)  # a plain user turn renders
    with pytest.raises(ChatFormatError, match="roles must alternate"):  # its template has no system turn
        chat_ids(mistral, asked()[1:], tools())


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
