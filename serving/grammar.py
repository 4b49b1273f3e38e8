"""Constrained decoding on the local model server: what `tool_choice` ("required" or a named tool) and
`response_format` (json_object, json_schema) promise, kept by masking every token the grammar does not allow at
each step (llguidance, one of vLLM's structured-output backends), so the answer always parses as promised.

A grammar is Lark text in llguidance's variant (JSON schemas inline as `%json {...}`). `Grammars` holds the
engine's tokenizer as llguidance reads it and compiles a grammar into a `Constraint` per request; the engine asks
the constraint for each step's mask and tells it the token picked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

from fibreflow.core.chat import CALL_END, CALL_START
from fibreflow.core.errors import FibreFlowError

# JSON as json.dumps writes it and as the chat template renders a call's arguments; no free whitespace, so a
# constrained model cannot fill its budget with blanks
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class GrammarError(FibreFlowError):
    """A schema or grammar that cannot constrain generation (the message says where), or a token it refused."""


def tool_calls_grammar(tools: Sequence[dict[str, Any]], name: str | None = None) -> str:
    """One or more calls of `tools` (tool_choice "required"), or exactly one call of the tool `name`: each
    `<tool_call>{"name": ..., "arguments": ...}</tool_call>` with arguments valid against the tool's parameters.
    A newline may stand inside the tags and between calls, as the Hermes format of other chat templates has."""
    bodies = []
    for t in tools:
        f = t["function"]
        if name is None or f["name"] == name:
            bodies.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                           "properties": {"name": {"const": f["name"]},
                                          "arguments": f.get("parameters") or {"type": "object"}}})  # fmt: skip
    if not bodies:
        raise GrammarError(f"no tool named {name!r} among the tools offered")
    body = {"anyOf": bodies, "x-guidance": JSON_STYLE}
    start = "call" if name else 'call ("\\n"? call)*'
    return (
        f"start: {start}\n"
        f'call: {json.dumps(CALL_START)} "\\n"? body "\\n"? {json.dumps(CALL_END)}\n'
        f"body: %json {json.dumps(body)}\n"
    )


def json_grammar(schema: dict[str, Any] | None = None) -> str:
    """A JSON value valid against `schema` (response_format json_schema), or any JSON object (json_object)."""
    return f"start: %json {json.dumps((schema or {'type': 'object'}) | {'x-guidance': JSON_STYLE})}\n"


class Constraint:
    """One request's grammar state: the mask of the tokens allowed next, and the tokens picked so far."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def mask(self, logits: Any) -> Any:
        """`logits` (one row) with every token the grammar refuses at -inf, in place."""
        import torch

        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot go on: {self.matcher.get_error()[:300]}")
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)
        n = min(len(allowed), logits.shape[-1])
        logits[:n].masked_fill_(allowed[:n].to(logits.device) == 0, float("-inf"))
        logits[n:] = float("-inf")
        return logits

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self.matcher.get_error()[:300]}")


class Grammars:
    """Constraints for one engine's tokenizer (built on first use, ~0.2 s; shared by its requests)."""

    def __init__(self, tok: Any, vocab_size: int, eos: set[int]) -> None:
        self.tok, self.vocab_size, self.eos = tok, vocab_size, sorted(eos)
        self._lock = threading.Lock()
        self._ll: Any = None

    def _tokenizer(self) -> Any:
        import llguidance.hf

        with self._lock:
            if self._ll is None:
                try:
                    self._ll = llguidance.hf.from_tokenizer(self.tok, n_vocab=self.vocab_size, eos_token=self.eos)
                except ValueError as exc:  # not a fast tokenizer
                    raise GrammarError(f"constrained decoding needs a fast tokenizer: {exc}") from None
        return self._ll

    def constraint(self, lark: str) -> Constraint:
        """A fresh constraint for one request; a GrammarError saying what is wrong with the grammar otherwise."""
        import llguidance

        tokenizer = self._tokenizer()
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if failed:
            raise GrammarError(messages[0].strip())
        return Constraint(llguidance.LLMatcher(tokenizer, grammar, log_level=0))
