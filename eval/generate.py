"""Local batched generation: chat prompts -> greedy answers with transformers (+ a peft adapter).

Prompts are sorted by length so each batch pads little, padded on the left so every row ends at the
generation position, and a batch stops as soon as all its rows have emitted end-of-turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fibreflow.core.chat import chat_ids
from tqdm.auto import tqdm


def chat_prompts(
    tok: Any, conversations: Sequence[list[dict[str, Any]]], tools: list[dict[str, Any]] | None = None
) -> list[list[int]]:
    """Token ids of each conversation (with `tools` offered) followed by the assistant generation prompt."""
    return [chat_ids(tok, c, tools) for c in conversations]


def generate_local(
    model: Any,
    tok: Any,
    conversations: Sequence[list[dict[str, str]]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 96,
    progress: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Greedy answers, in the order of `conversations`."""
    import torch

    prompts = chat_prompts(tok, conversations, tools)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    pad = tok.pad_token_id
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
            with torch.no_grad():
                gen = model.generate(
                    input_ids=ids.to(model.device),
                    attention_mask=mask.to(model.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=tok.eos_token_id,
                )
            for row, i in enumerate(idx):
                out[i] = tok.decode(gen[row, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return out
