"""Evaluation config (`configs/eval.yaml`): what to score, how to generate, retrieve and judge."""

from __future__ import annotations

from typing import Any, Literal

from fibreflow.core.config import Strict, load_config
from pydantic import Field, PositiveInt, model_validator

JudgeMetric = Literal["faithfulness", "answer_relevancy", "factual_correctness", "context_precision", "context_recall"]


class Sampling(Strict):
    seed: int = 0
    per_tag: dict[str, int | None] = Field(default_factory=dict)


class Generation(Strict):
    batch_size: PositiveInt = 32
    max_new_tokens: PositiveInt = 64
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 where native, else float32
    merge_adapters: bool = False  # a local adapter scored merged into its dequantized base, in `dtype`


class Rag(Strict):
    mode: Literal["retrieve", "given", "off"] = "retrieve"
    k: PositiveInt = 4


class ToolLoop(Strict):
    max_steps: int = Field(3, ge=1, le=8)  # rounds of tool calls before the answer is asked for
    max_new_tokens: PositiveInt = 96  # per turn of the loop (a call with dates is ~60 tokens)


class Endpoint(Strict):
    base_url: str
    model: str
    api_key_env: str | None = None


class Judge(Strict):
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    repeats: PositiveInt = 3
    timeout_s: float = Field(120, gt=0)
    concurrency: PositiveInt = 4
    metrics: list[JudgeMetric] = Field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(self.base_url and self.model and self.metrics)

    @model_validator(mode="after")
    def _both_or_neither(self) -> Judge:
        if bool(self.base_url) != bool(self.model):
            raise ValueError("judge.base_url and judge.model go together (set both, or neither)")
        return self


class Bootstrap(Strict):
    confidence: float = Field(0.95, gt=0, lt=1)
    resamples: PositiveInt = 10_000
    seed: int = 0


class EvalConfig(Strict):
    test_set: str | None = None
    data_version: str | None = None
    models: list[str] = Field(min_length=1, max_length=2)
    base_model: str
    sample: Sampling = Sampling()
    generation: Generation = Generation()
    rag: Rag = Rag()
    tools: ToolLoop = ToolLoop()
    endpoints: dict[str, Endpoint] = Field(default_factory=dict)
    endpoint_concurrency: PositiveInt = 8
    semantic_similarity: bool = True
    judge: Judge = Judge()
    bootstrap: Bootstrap = Bootstrap()
    experiment: str = "fibreflow-eval"


def load_eval_config(overrides: dict[str, Any] | None = None) -> EvalConfig:
    return load_config(EvalConfig, "eval", overrides)
