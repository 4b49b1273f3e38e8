"""A known-better and a known-worse model for promotion and regression tests (imported by name: pytest puts tests/
on sys.path). The test set's references are adapter A's own greedy answers, so A is right on every question and
any other adapter is wrong on most."""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = [f"What does fibreflow code {i} mean?" for i in range(8)]


def write_reference_test_set(home: Path, adapter: Path) -> None:
    """References = the adapter's own greedy answers, generated exactly as `fibreflow eval` will."""
    from fibreflow.datasets.build import load_data_config
    from fibreflow.eval.config import load_eval_config
    from fibreflow.eval.rag import build_prompts
    from fibreflow.eval.run import answers_of
    from fibreflow.eval.testset import Sample

    cfg = load_eval_config()
    samples = [Sample(id=str(i), question=q, reference="", kind="exact") for i, q in enumerate(QUESTIONS)]
    prompts = build_prompts(samples, load_data_config().system_prompt, cfg.rag)
    answers, _ = answers_of(str(adapter), cfg, prompts)
    assert all(a.strip() for a in answers)
    rows = [
        {"id": str(i), "question": q, "reference": a, "kind": "exact"}
        for i, (q, a) in enumerate(zip(QUESTIONS, answers, strict=True))
    ]
    (home / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
