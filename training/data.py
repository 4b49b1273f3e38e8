"""Chat examples -> token ids with loss on assistant tokens only -> packed (padding-free) or padded batches.

Assistant spans come from the tokenizer's own chat template by prefix difference: the tokens that
`messages[:k+1]` adds after the generation prompt of `messages[:k]` are turn k's answer (end-of-turn token
included). That works for any template that renders a conversation as a prefix of its continuation.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fibreflow.core.chat import chat_ids
from fibreflow.core.errors import DatasetBuildError

IGNORE = -100


def check_examples(rows: Sequence[dict[str, Any]], split: str) -> None:
    """Fail before any model loads: an empty split, or an example without an assistant turn to learn from."""
    if len(rows) == 0:
        raise DatasetBuildError(f"the {split} split is empty: rebuild the dataset (`fibreflow data build`)")
    for i, row in enumerate(rows):
        messages = row.get("messages")
        if not messages:
            raise DatasetBuildError(f"{split} row {i}: no `messages` (expected a list of chat turns)")
        if not any(m.get("role") == "assistant" and (m.get("content") or m.get("tool_calls")) for m in messages):
            raise DatasetBuildError(f"{split} row {i} ({row.get('id', '?')}): no assistant turn to train on")


def tokenize_chat(
    tok: Any, messages: list[dict[str, Any]], max_len: int, tools: Sequence[dict[str, Any]] | None = None
) -> dict[str, list[int]]:
    """`input_ids` of the whole conversation (with `tools` offered) and `labels` that are -100 except on assistant
    turns (their tool calls included)."""
    ids = chat_ids(tok, messages, tools, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight") == 0:  # weight 0: context to answer after, not to learn
            continue
        prompt = chat_ids(tok, messages[:k], tools, generation_prompt=True)
        start = len(prompt)
        upto = chat_ids(tok, messages[: k + 1], tools, generation_prompt=False)
        end = len(upto)
        if ids[:end] != upto or start > end:
            raise DatasetBuildError("the chat template does not render a conversation as a prefix of its continuation")
        if ids[:start] != prompt:  # the model would be asked with tokens it never saw before an answer
            raise DatasetBuildError(
                "the generation prompt does not tokenize as it does before the answer: with this chat template and "
                f"tokenizer, {tok.decode(prompt[-3:])!r} at its end merges differently with the answer's first tokens"
            )
        labels[start:end] = ids[start:end]
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def shifted(labels: list[int]) -> list[int]:
    """Next-token targets of one sequence: position i predicts token i+1; the last position predicts nothing."""
    return [*labels[1:], IGNORE]


def pack(examples: Sequence[dict[str, list[int]]], row_len: int, seed: int) -> list[dict[str, list[int]]]:
    """Concatenate shuffled examples into rows of at most `row_len` tokens (a longer example is a row of its own);
    `position_ids` restart per example, which is how the model keeps attention inside each example (no
    cross-contamination, no padding)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[dict[str, list[int]]] = []
    row: dict[str, list[int]] = {"input_ids": [], "shift_labels": [], "position_ids": []}
    for i in order:
        ex = examples[i]
        n = len(ex["input_ids"])
        if row["input_ids"] and len(row["input_ids"]) + n > row_len:
            rows.append(row)
            row = {"input_ids": [], "shift_labels": [], "position_ids": []}
        row["input_ids"] += ex["input_ids"]
        row["shift_labels"] += shifted(ex["labels"])
        row["position_ids"] += list(range(n))
    if row["input_ids"]:
        rows.append(row)
    return rows


def unpacked(examples: Sequence[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    return [{"input_ids": ex["input_ids"], "shift_labels": shifted(ex["labels"])} for ex in examples]


@dataclass
class Collator:
    """Rows right-padded to the longest row of the micro-batch.

    Packed rows carry `position_ids` and no attention mask: the model then keeps attention inside each
    example. The padding tail gets its own positions, so it forms a separate (ignored) sequence.
    Unpacked rows get the classic attention mask.
    """

    pad_id: int
    packed: bool

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        padded = [(r, width - len(r["input_ids"])) for r in rows]
        batch = {
            "input_ids": torch.tensor([r["input_ids"] + [self.pad_id] * p for r, p in padded]),
            "shift_labels": torch.tensor([r["shift_labels"] + [IGNORE] * p for r, p in padded]),
        }
        pad = [p for _, p in padded]
        if self.packed:
            batch["position_ids"] = torch.tensor([r["position_ids"] + list(range(p)) for r, p in padded])
        else:
            batch["attention_mask"] = torch.tensor([[1] * (width - p) + [0] * p for p in pad])
        batch["labels"] = batch["shift_labels"]  # the Trainer looks for `labels`; the loss uses `shift_labels`
        return batch


def chats(
    rows: Sequence[dict[str, Any]], tok: Any, tools: Sequence[dict[str, Any]], turns: int, seq_len: int, seed: int
) -> list[dict[str, Any]]:
    """Rows merged into multi-turn chats of up to `turns` questions and `seq_len` tokens: rows with the same system
    turn and tools flag, in a seeded order, their system turn (and the tool block) rendered once per chat instead
    of once per question. Each question's turns, and so what is learned, are unchanged; the tokens a question costs
    are its own. A row without a system turn stays alone."""
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = defaultdict(list)
    merged: list[dict[str, Any]] = []
    for r in rows:
        first = r["messages"][0]
        if turns > 1 and first["role"] == "system":
            groups[(first["content"], bool(r.get("tools")))].append(r)
        else:
            merged.append(r)
    rng = random.Random(seed)
    for (system, with_tools), members in sorted(groups.items()):
        offered = tools if with_tools else None
        head = len(chat_ids(tok, [{"role": "system", "content": system}], offered, generation_prompt=False))
        rng.shuffle(members)
        chat: list[dict[str, Any]] = []
        size = head
        for r in members:
            n = len(chat_ids(tok, r["messages"], offered, generation_prompt=False)) - head
            if chat and (len(chat) == turns or size + n > seq_len):
                merged.append(_merge(chat))
                chat, size = [], head
            chat.append(r)
            size += n
        if chat:
            merged.append(_merge(chat))
    return merged


def _merge(rows: list[dict[str, Any]]) -> dict[str, Any]:
    messages = [rows[0]["messages"][0]] + [m for r in rows for m in r["messages"][1:]]
    return {"messages": messages, "tools": bool(rows[0].get("tools"))}


def prepare(
    rows: Sequence[dict[str, Any]],
    tok: Any,
    seq_len: int,
    packing: bool,
    seed: int,
    pack_len: int | None = None,
    turns: int = 1,
) -> list[dict[str, list[int]]]:
    """Chat rows -> training rows (merged `turns` questions to a chat, see `chats`; each example cut at
    `seq_len`; packed into rows of `pack_len`, default `seq_len`, or one example per row); a row with `tools` true
    is rendered with FibreFlow's tool schemas offered, as the assistant's tool loop asks."""
    from fibreflow.datasets.tools import schemas

    tools = schemas()
    rows = chats(rows, tok, tools, turns, seq_len, seed) if turns > 1 else rows
    examples = [tokenize_chat(tok, r["messages"], seq_len, tools if r.get("tools") else None) for r in rows]
    return pack(examples, pack_len or seq_len, seed) if packing else unpacked(examples)


def count_tokens(rows: Sequence[dict[str, list[int]]]) -> tuple[int, int]:
    """(tokens, tokens that carry a label) of prepared rows."""
    return sum(len(r["input_ids"]) for r in rows), sum(sum(t != IGNORE for t in r["shift_labels"]) for r in rows)
