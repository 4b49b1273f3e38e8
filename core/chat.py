"""Chats as token ids, with tools: one rendering for training, evaluation, the model server and vLLM.

Every model writes its calls in one format, Hermes-style `<tool_call>{"name", "arguments"}</tool_call>`, which
`parse_tool_calls` and vLLM's `hermes` tool-call parser read. A tokenizer whose own chat template writes calls so
(Qwen2.5, Hermes) renders them itself. A ChatML one without a tool format (the bundled SmolLM2) renders through
`chatml_tools.jinja`: identical to its own template for plain chats, plus the tools as compact signatures in the
system turn and results in `tool` turns. Any other (no tool format: Llama 3.0; calls in another format: Llama 3.1,
Mistral) renders through `hermes_tools.jinja` put in front of its own template: the conversation rewritten into
plain turns, tools in the system turn, calls in the assistant's text, results in a user turn of `<tool_response>`
blocks, so plain chats render exactly as before.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fibreflow.core.errors import FibreFlowError

TOOLS_TEMPLATE = Path(__file__).with_name("chatml_tools.jinja")
HERMES_PRELUDE = Path(__file__).with_name("hermes_tools.jinja")
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_CALLS = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class ChatFormatError(FibreFlowError):
    """A conversation the model's chat template cannot render (roles, order)."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = ""

    def text(self) -> str:
        """The call as the model writes it (parse_tool_calls' inverse)."""
        return f'{CALL_START}{{"name": {json.dumps(self.name)}, "arguments": {self.arguments}}}{CALL_END}'

    def openai(self) -> dict[str, Any]:
        return {"id": self.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip


def template_for(tok: Any) -> str | None:
    """The template to render with: None for the tokenizer's own where it writes Hermes calls already (or is not a
    single template), ours for a ChatML one without a tool format, else the Hermes prelude before its own."""
    own = tok.chat_template
    if not isinstance(own, str) or not own or CALL_START in own:
        return None
    if "<|im_start|>" in own and "tools" not in own:
        return TOOLS_TEMPLATE.read_text()
    return HERMES_PRELUDE.read_text().rstrip("\n") + own


def chat_ids(
    tok: Any,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    *,
    generation_prompt: bool = True,
) -> list[int]:
    """Token ids of `messages` (OpenAI shape: tool_calls and tool turns too), with `tools` offered."""
    try:
        enc = tok.apply_chat_template(
            list(messages),
            tools=list(tools) if tools else None,
            chat_template=template_for(tok),
            tokenize=True,
            add_generation_prompt=generation_prompt,
            return_dict=True,
        )
    except Exception as exc:  # a template that rejects the conversation (roles, order)
        raise ChatFormatError(f"the chat template rejected the messages ({exc})") from None
    return list(enc["input_ids"])


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content before the first call or None, the calls) of a model's answer. An answer whose calls are not all
    JSON objects with a name and arguments is content, no call (as vLLM's hermes parser does)."""
    if CALL_START not in text:
        return text, []
    calls = []
    for body in _CALLS.findall(text):
        try:
            obj = json.loads(body)
        except ValueError:
            return text, []
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict)):
            return text, []
        calls.append(ToolCall(obj["name"], json.dumps(obj["arguments"], ensure_ascii=False)))
    content = text[: text.index(CALL_START)]
    return content or None, calls


def held_back(text: str) -> int:
    """Where streamed content must stop so that no part of a `<tool_call>` tag leaves as content: the index of
    the tag, or of a suffix that may become one."""
    if CALL_START in text:
        return text.index(CALL_START)
    for k in range(min(len(CALL_START) - 1, len(text)), 0, -1):
        if CALL_START.startswith(text[-k:]):
            return len(text) - k
    return len(text)
