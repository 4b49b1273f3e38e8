"""Conversations with tool calls, and a tiny Llama trained to reproduce them: a model that really answers with a
`<tool_call>` (and with the answer once the tool's result is in), so the stack's tool handling is tested on
generated text, not on a fake."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SYSTEM = "You are FibreFlow's fibre-construction assistant. Answer briefly; if you don't know, say so."
QUESTION = "How many poles on project PRJ-0003 are still waiting for permission?"
ARGS = {"project_id": "PRJ-0003", "status": "permission_pending"}
RESULT = {"poles_by_status": {"permission_pending": 14}, "total": 14, "unit": "poles"}
ANSWER = "Project PRJ-0003 has 14 poles waiting for permission [PRJ-0003]."
PLAIN_QUESTION = "What is a BOQ?"
PLAIN_ANSWER = "A BOQ is the bill of quantities of a project."
SEARCH_QUESTION = "Which tasks are blocked?"
SEARCH_ARGS = {"query": "blocked tasks"}

# Meta-Llama-3-8B-Instruct's own template (configs/models.yaml's production default): no tool format
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def tools() -> list[dict[str, Any]]:
    from fibreflow.datasets.tools import TOOLS

    return [t.schema() for t in TOOLS.values()]


def call_turn(call_id: str = "call_1", name: str = "pole_counts", args: dict[str, Any] = ARGS) -> dict[str, Any]:
    fn = {"name": name, "arguments": json.dumps(args)}
    return {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": fn}]}


def asked(question: str = QUESTION) -> list[dict[str, Any]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def answered() -> list[dict[str, Any]]:
    """The conversation up to the tool's result: the next turn is the answer."""
    return [*asked(), call_turn(), {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(RESULT)}]


def train_tool_llama(tiny: Path, out: Path, steps: int = 60, llama3: bool = False) -> Path:
    """The tiny Llama, all weights trained until it reproduces the conversations greedily: question -> the call
    (tools offered), the call's result -> the answer, a plain question (no tools) -> a plain answer, a question for
    the record search -> its call. With `llama3`, its tokenizer is made Llama 3's: its chat template (no tool format)
    and special tokens, `<|eot_id|>` ending each turn and the generation."""
    import torch
    from fibreflow.training.data import IGNORE, tokenize_chat
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    if llama3:  # Llama 3's tokenizer keeps "\n\n" one token before any text, SmolLM2's not before "<" (test_data.py)
        from tokenizers import AddedToken

        tok.add_special_tokens({"eos_token": "<|eot_id|>"})
        tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>"], special_tokens=True)
        tok.add_tokens([AddedToken("\n\n", normalized=False)])
        tok.chat_template = LLAMA3
    chats = [
        ([*asked(), call_turn()], tools()),
        ([*answered(), {"role": "assistant", "content": ANSWER}], tools()),
        ([*asked(PLAIN_QUESTION), {"role": "assistant", "content": PLAIN_ANSWER}], None),
        ([*asked(SEARCH_QUESTION), call_turn("call_1", "search_records", SEARCH_ARGS)], tools()),
    ]
    rows = [tokenize_chat(tok, m, 1024, t) for m, t in chats]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    if llama3:
        model.resize_token_embeddings(len(tok))
        model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            labels = torch.tensor([[x if x != IGNORE else -100 for x in r["labels"]]])
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out
