"""A known-better and a known-worse model for promotion and regression tests (imported by name: pytest puts tests/
on sys.path). The test set's references are adapter A's own greedy answers, so A is right on every question and
any other adapter is wrong on most."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

QUESTIONS = [f"What does fibreflow code {i} mean?" for i in range(8)]


def write_reference_test_set(home: Path, adapter: Path) -> None:
    """References = the adapter's own greedy answers, generated exactly as `fibreflow eval` will."""
    from fibreflow.datasets.config import load_data_config
    from fibreflow.eval.config import load_eval_config
    from fibreflow.eval.rag import build_prompts
    from fibreflow.eval.run import answers_of
    from fibreflow.eval.testset import Sample

    cfg = load_eval_config()
    samples = [Sample(id=str(i), question=q, reference="", kind="exact") for i, q in enumerate(QUESTIONS)]
    prompts = build_prompts(samples, load_data_config().system_prompt, cfg.rag)
    answers, _, _ = answers_of(str(adapter), cfg, prompts, samples)
    assert all(a.strip() for a in answers)
    rows = [
        {"id": str(i), "question": q, "reference": a, "kind": "exact"}
        for i, (q, a) in enumerate(zip(QUESTIONS, answers, strict=True))
    ]
    (home / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@contextmanager
def serving_versions(tiny_llama: Path, run_app: Any, roots: tuple[Path, ...], versions: list[str]) -> Iterator[Any]:
    """The local model server on the tiny Llama with these registered versions' adapters loaded, as the router's
    arms name them (`fibreflow-assistant-v<N>`): yields (its URL, the engine), closed after."""
    from fibreflow.serving.engine import Engine
    from fibreflow.serving.model_server import create_model_app
    from fibreflow.training.models import load_tokenizer
    from fibreflow.training.weights import weights
    from transformers import AutoModelForCausalLM

    engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), load_tokenizer(str(tiny_llama)),
                    base_name="tiny", max_context=1024, batch_wait_ms=5)  # fmt: skip
    try:
        for v in versions:
            engine.load_adapter(f"fibreflow-assistant-v{v}", weights(f"models:/fibreflow-assistant/{v}").adapter or "")
        yield run_app(create_model_app(engine, adapter_roots=roots)), engine
    finally:
        engine.close()
