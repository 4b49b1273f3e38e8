"""Per-sample scores: accuracy by kind, RAGAS metrics that need no LLM, and LLM-judge metrics with repeats.

Every metric yields one value per sample, or None where it does not apply (a context metric on a question
without records) or could not be measured (every judge repeat failed). None is never turned into 0: failures
are counted per metric and reported.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fibreflow.eval.config import Judge
from fibreflow.eval.generators import run_sync
from fibreflow.eval.scorers import score
from fibreflow.eval.testset import Sample
from tqdm.auto import tqdm

os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")

Scores = dict[str, list[float | None]]

# accuracy groups: metric -> does the sample belong to it
GROUPS: dict[str, Callable[[Sample], bool]] = {
    "accuracy": lambda s: True,
    "terminology_accuracy": lambda s: "terminology" in s.tags and "unknown_term" not in s.tags,
    "unknown_term_refusal": lambda s: "unknown_term" in s.tags,
    "grounded_accuracy": lambda s: "grounded_qa" in s.tags,
    # through the tool loop: the first call, the answer to a data question, "I don't know" where it should be
    "tool_call_accuracy": lambda s: s.kind == "tool_call",
    "tool_grounded_accuracy": lambda s: s.tools and "grounded" in s.tags,
    "refusal_accuracy": lambda s: s.tools and s.refusal,
}


def accuracy(samples: list[Sample], answers: list[str]) -> Scores:
    right = [score(s, a) for s, a in zip(samples, answers, strict=True)]
    out = {
        name: [r if belongs(s) else None for s, r in zip(samples, right, strict=True)]
        for name, belongs in GROUPS.items()
    }
    return {name: values for name, values in out.items() if any(v is not None for v in values)}


def embeddings(model: str) -> Any:
    """RAGAS embeddings on the self-hosted model (`embed.yaml`'s: the bundled MiniLM by default)."""
    from fibreflow.datasets.embedding import bundled_model_path
    from ragas.embeddings import HuggingFaceEmbeddings

    return HuggingFaceEmbeddings(model=str(bundled_model_path() if model == "bundled" else model), device="cpu")


def answer_metrics(samples: list[Sample], answers: list[str], embedder: Any | None, progress: bool = False) -> Scores:
    """RAGAS metrics of an answer against the reference that need no LLM (+ SemanticSimilarity with `embedder`)."""
    from ragas.metrics.collections import (
        BleuScore,
        ExactMatch,
        NonLLMStringSimilarity,
        RougeScore,
        SemanticSimilarity,
        StringPresence,
    )

    metrics: dict[str, Any] = {
        "string_similarity": NonLLMStringSimilarity(),
        "rouge_l": RougeScore(),
        "bleu": BleuScore(),
        "exact_match": ExactMatch(),
        "string_presence": StringPresence(),
    }
    if embedder is not None:
        metrics["semantic_similarity"] = SemanticSimilarity(embeddings=embedder)

    async def all_rows() -> Scores:
        out: Scores = {name: [] for name in metrics}
        rows = zip(samples, answers, strict=True)
        for s, a in tqdm(rows, total=len(samples), desc="ragas", disable=not progress, leave=False):
            for name, m in metrics.items():
                out[name].append(float((await m.ascore(reference=s.reference, response=a)).value))
        return out

    return run_sync(all_rows())


def retrieval_metrics(samples: list[Sample], retrieved: list[list[str]]) -> Scores:
    """Non-LLM RAGAS context recall / precision of what was retrieved against the row's own contexts."""
    from ragas import SingleTurnSample
    from ragas.metrics import _NonLLMContextPrecisionWithReference, _NonLLMContextRecall

    recall, precision = _NonLLMContextRecall(), _NonLLMContextPrecisionWithReference()

    async def all_rows() -> Scores:
        out: Scores = {"context_recall": [], "context_precision": []}
        for s, got in zip(samples, retrieved, strict=True):
            if not (s.contexts and got):
                out["context_recall"].append(None)
                out["context_precision"].append(None)
                continue
            row = SingleTurnSample(user_input=s.question, retrieved_contexts=got, reference_contexts=s.contexts)
            out["context_recall"].append(float(await recall.single_turn_ascore(row)))
            out["context_precision"].append(float(await precision.single_turn_ascore(row)))
        return out

    return run_sync(all_rows())


@dataclass
class Judged:
    """LLM-judge results: per sample the mean over the repeats that succeeded, and their spread (stdev)."""

    scores: Scores = field(default_factory=dict)
    spread: Scores = field(default_factory=dict)
    failures: dict[str, Counter[str]] = field(default_factory=dict)  # metric -> failure kind -> count
    calls: int = 0


# metric -> (needs retrieved contexts, factory(llm, embeddings), call(metric, sample, response, contexts))
_JUDGE: dict[str, tuple[bool, Callable[..., Any], Callable[..., Awaitable[Any]]]] = {}


def _judge_table() -> dict[str, tuple[bool, Callable[..., Any], Callable[..., Awaitable[Any]]]]:
    from ragas.metrics.collections import (
        AnswerRelevancy,
        ContextPrecision,
        ContextRecall,
        FactualCorrectness,
        Faithfulness,
    )

    if not _JUDGE:
        _JUDGE.update(
            {
                "faithfulness": (
                    True,
                    lambda llm, emb: Faithfulness(llm=llm),
                    lambda m, s, r, c: m.ascore(user_input=s.question, response=r, retrieved_contexts=c),
                ),
                "answer_relevancy": (
                    False,
                    lambda llm, emb: AnswerRelevancy(llm=llm, embeddings=emb),
                    lambda m, s, r, c: m.ascore(user_input=s.question, response=r),
                ),
                "factual_correctness": (
                    False,
                    lambda llm, emb: FactualCorrectness(llm=llm),
                    lambda m, s, r, c: m.ascore(response=r, reference=s.reference),
                ),
                "context_precision": (
                    True,
                    lambda llm, emb: ContextPrecision(llm=llm),
                    lambda m, s, r, c: m.ascore(user_input=s.question, reference=s.reference, retrieved_contexts=c),
                ),
                "context_recall": (
                    True,
                    lambda llm, emb: ContextRecall(llm=llm),
                    lambda m, s, r, c: m.ascore(user_input=s.question, retrieved_contexts=c, reference=s.reference),
                ),
            }
        )
    return _JUDGE


def failure_kind(exc: BaseException) -> str:
    """timeout | http (no answer or an error status) | unparseable (answered, but not in the schema) | error.
    Instructor wraps the client's exception after its retries: the cause decides."""
    import openai
    from pydantic import ValidationError

    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for cause in chain:
        if isinstance(cause, asyncio.TimeoutError | openai.APITimeoutError):
            return "timeout"
        if isinstance(cause, openai.APIStatusError | openai.APIConnectionError):
            return "http"
    if any(isinstance(c, ValidationError | ValueError) or "Retry" in type(c).__name__ for c in chain):
        return "unparseable"
    return "error"


def judge(
    cfg: Judge,
    samples: list[Sample],
    responses: list[str],
    contexts: list[list[str]],
    embedder: Any,
    metrics: list[str] | None = None,
    progress: bool = False,
) -> Judged:
    """Each configured LLM-judge metric, `cfg.repeats` times per sample, `cfg.concurrency` calls at once."""
    return run_sync(_judge(cfg, samples, responses, contexts, embedder, metrics or list(cfg.metrics), progress))


async def _judge(
    cfg: Judge,
    samples: list[Sample],
    responses: list[str],
    contexts: list[list[str]],
    embedder: Any,
    metrics: list[str],
    progress: bool,
) -> Judged:
    import openai
    from ragas.llms import llm_factory

    key = os.environ.get(cfg.api_key_env or "", "") or "none"
    client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=1)
    llm = llm_factory(str(cfg.model), provider="openai", client=client)
    gate = asyncio.Semaphore(cfg.concurrency)
    table = _judge_table()
    out = Judged()
    bar = tqdm(total=0, desc="judge", disable=not progress, leave=False)

    async def once(call: Callable[[], Awaitable[Any]], name: str) -> float | None:
        async with gate:
            out.calls += 1
            try:
                return float((await asyncio.wait_for(call(), cfg.timeout_s)).value)
            except Exception as exc:  # every failure is counted by kind, never scored
                out.failures[name][failure_kind(exc)] += 1
                return None
            finally:
                bar.update()

    async def sample_score(name: str, m: Any, call: Callable[..., Awaitable[Any]], i: int) -> list[float]:
        s = samples[i]
        reps = [once(lambda: call(m, s, responses[i], contexts[i]), name) for _ in range(cfg.repeats)]
        return [v for v in await asyncio.gather(*reps) if v is not None]

    try:
        for name in metrics:
            needs_contexts, make, call = table[name]
            m = make(llm, embedder)
            out.failures[name] = Counter()
            todo = [i for i, s in enumerate(samples)  # a tool call is no answer to judge
                    if s.kind != "tool_call" and (contexts[i] or not needs_contexts)]  # fmt: skip
            bar.total += len(todo) * cfg.repeats
            found = await asyncio.gather(*(sample_score(name, m, call, i) for i in todo))
            out.scores[name] = [None] * len(samples)
            out.spread[name] = [None] * len(samples)
            for i, values in zip(todo, found, strict=True):
                if values:
                    out.scores[name][i] = statistics.fmean(values)
                    out.spread[name][i] = statistics.pstdev(values)
    finally:
        bar.close()
        await client.close()
    return out
