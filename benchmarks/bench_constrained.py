"""The cost of constrained decoding on the local model server's engine: forced tool calls against free answers.

    python benchmarks/bench_constrained.py [--users 1 8] [--max-tokens 160] [--champion]    # ~4 min on 2 cores

The bundled SmolLM2-135M-Instruct (bf16, no adapter) on the model server's engine, or with --champion the
registry's @champion as `fibreflow serve-model` serves it (merged); FibreFlow's six tools offered, the assistant's
system prompt, 16 questions about the records, greedy. Each question is asked free (tool_choice "auto": whatever
the model writes) and forced (tool_choice "required": the tool-call grammar masks every step, serving/grammar.py).
At 1 and 8 concurrent requests: ms per generated token, the grammar's share of it, and how many answers are valid
calls (an offered tool, arguments that pass its validation).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

QUESTIONS = [
    "How many poles on PRJ-0003 are still waiting for permission?",
    "What's the status of project PRJ-0007?",
    "How much has been budgeted for cabling on PRJ-0002?",
    "How many metres of trench were dug on PRJ-0005 last week?",
    "Which tasks are blocked on PRJ-0001?",
    "Give me the BOQ total for Umhlanga Central FTTH Phase 3.",
    "How many poles were planted on PRJ-0004?",
    "What progress was made on PRJ-0006 between 2026-03-01 and 2026-03-15?",
    "Find the daily reports that mention rain delays.",
    "How many tasks are still to do on PRJ-0008?",
    "What is the civil works amount for PRJ-0003?",
    "Show me rejected poles on PRJ-0002.",
    "How many homes were connected on PRJ-0001 this month?",
    "Is PRJ-0005 finished?",
    "Which splicing items are on the BOQ of PRJ-0004?",
    "Records about permission problems in Durban",
]


def valid(text: str) -> bool:
    from fibreflow.core.chat import parse_tool_calls
    from fibreflow.datasets.tools import TOOLS

    _, calls = parse_tool_calls(text)
    try:
        return bool(calls) and all(TOOLS[c.name].args.model_validate(json.loads(c.arguments)) for c in calls)
    except (KeyError, ValueError):
        return False


async def run(engine: Any, prompts: list[list[int]], grammar: str | None, users: int, max_tokens: int
              ) -> dict[str, float]:  # fmt: skip
    from fibreflow.serving.engine import Sampling

    gate = asyncio.Semaphore(users)
    texts: list[str] = []
    mask_s = 0.0

    async def one(ids: list[int]) -> None:
        nonlocal mask_s
        async with gate:
            constraint = engine.constraint(grammar) if grammar else None
            if constraint is not None:  # time the grammar's own work: its mask per step and its token intake
                mask, accept = constraint.mask, constraint.accept

                def timed_mask(logits: Any) -> Any:
                    nonlocal mask_s
                    t = time.perf_counter()
                    out = mask(logits)
                    mask_s += time.perf_counter() - t
                    return out

                def timed_accept(token: int) -> None:
                    nonlocal mask_s
                    t = time.perf_counter()
                    accept(token)
                    mask_s += time.perf_counter() - t

                constraint.mask, constraint.accept = timed_mask, timed_accept  # type: ignore[method-assign]
            text, _ = await engine.complete(engine.base_name, ids, max_tokens, Sampling(), (), constraint)
            texts.append(text)

    tokens0, t0 = engine.tokens, time.perf_counter()
    await asyncio.gather(*(one(ids) for ids in prompts))
    wall, tokens = time.perf_counter() - t0, engine.tokens - tokens0
    return {"ms_per_token": 1000 * wall / tokens, "tokens": tokens, "grammar_ms_per_token": 1000 * mask_s / tokens,
            "valid": sum(map(valid, texts)), "answers": len(texts)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--champion", action="store_true", help="the registry's @champion, merged, as served")
    args = ap.parse_args()

    from fibreflow.datasets.config import load_data_config
    from fibreflow.datasets.tools import TOOLS
    from fibreflow.serving.engine import Engine
    from fibreflow.serving.grammar import tool_calls_grammar

    if args.champion:
        from fibreflow.serving.config import load_serving_config
        from fibreflow.serving.model_server import build_engine

        base_engine, merged = build_engine(load_serving_config())
        if not merged:
            raise SystemExit("no @champion in the registry: run the main job first")
        base_engine.close()
        engine = next(iter(merged.values()))  # model_server.merged_aliases: [champion]
    else:
        from fibreflow.training.weights import load_local, weights

        net, tok = load_local(weights("smollm2-135m-instruct"), "bfloat16")
        engine = Engine(net, tok, base_name="base", max_context=2048, max_batch=16)
    print(f"model: {engine.base_name}", flush=True)
    tools = [t.schema() for t in TOOLS.values()]
    system = load_data_config().system_prompt
    prompts = [engine.chat_ids([{"role": "system", "content": system}, {"role": "user", "content": q}], tools)
               for q in QUESTIONS]  # fmt: skip
    asyncio.run(run(engine, prompts[:2], None, 2, 8))  # warm-up
    rows = []
    for users in args.users:
        for label, grammar in (("free (auto)", None), ("forced (required)", tool_calls_grammar(tools))):
            r = asyncio.run(run(engine, prompts, grammar, users, args.max_tokens))
            rows.append((users, label, r))
            print(f"{users} users, {label:18s}: {r['ms_per_token']:6.1f} ms/token over {r['tokens']} tokens, "
                  f"grammar {r['grammar_ms_per_token']:.2f} ms/token, valid calls {r['valid']}/{r['answers']}",
                  flush=True)  # fmt: skip
    engine.close()
    print(
        "\n| users | answers | ms per token | grammar ms per token | valid calls | × free |\n|---|---|---|---|---|---|"
    )
    free = {u: r["ms_per_token"] for u, label, r in rows if label.startswith("free")}
    for users, label, r in rows:
        print(
            f"| {users} | {label} | {r['ms_per_token']:.1f} | {r['grammar_ms_per_token']:.2f} | "
            f"{r['valid']}/{r['answers']} | {r['ms_per_token'] / free[users]:.2f} |"
        )


if __name__ == "__main__":
    main()
