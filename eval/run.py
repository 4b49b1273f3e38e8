"""`fibreflow eval`: champion vs challenger on identical samples and prompts, paired CIs, gates, all in MLflow.

test set -> seeded sample -> prompts (RAG for grounded questions, shared by both models) -> answers per model ->
per-sample scores (accuracy, RAGAS, judge) -> paired bootstrap per metric -> gate decision -> MLflow run with
params, metrics, tags (which model versions), a per-sample table, a comparison plot and the decision.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fibreflow.datasets.agent import Loop
from fibreflow.eval import metrics as m
from fibreflow.eval.config import EvalConfig, load_eval_config
from fibreflow.eval.gates import Decision, decide, load_gates
from fibreflow.eval.loop import contexts_of, numbers_grounded
from fibreflow.eval.rag import Prompt, build_prompts, grounded
from fibreflow.eval.stats import PairedDiff, paired_bootstrap
from fibreflow.eval.summary import Diff, EvalSummary, Gate, JudgeStats, label, load_summary, log_summary
from fibreflow.eval.testset import Sample, load_test_set

ROLES = ("champion", "challenger")
ANSWER_JUDGED = ("faithfulness", "answer_relevancy", "factual_correctness")
RETRIEVAL_JUDGED = ("context_precision", "context_recall")


def select(samples: list[Sample], cfg: EvalConfig) -> list[Sample]:
    """A seeded sample per tag (a row counts for the first tag of `per_tag` it carries); untagged rows all stay.
    The file's order is kept, so the same config always evaluates the same rows in the same order."""
    per_tag = cfg.sample.per_tag
    groups: dict[str | None, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(next((t for t in per_tag if t in s.tags), None), []).append(i)
    rng = random.Random(cfg.sample.seed)
    keep: list[int] = []
    for tag, idx in groups.items():
        n = per_tag.get(tag) if tag is not None else None
        keep += idx if n is None or n >= len(idx) else rng.sample(idx, n)
    return [samples[i] for i in sorted(keep)]


def test_set_path(cfg: EvalConfig) -> Path:
    if cfg.test_set:
        return Path(cfg.test_set)
    from fibreflow.datasets.build import TEST_SET, load_data_config, version_dir

    return version_dir(load_data_config(), cfg.data_version) / TEST_SET


def answers_of(
    spec: str,
    cfg: EvalConfig,
    prompts: list[Prompt],
    samples: list[Sample],
    progress: bool = False,
    system: str = "",
    database_url: str | None = None,
) -> tuple[list[str], dict[str, Any], dict[int, Loop]]:
    """(answers, generation settings + throughput, the tool loop of each `tools` sample by index) for one model;
    its weights are freed afterwards. `samples` with `tools: true` go through the tool loop instead of `prompts`."""
    from fibreflow.eval.loop import answer_all
    from fibreflow.eval.models import generator

    gen = generator(spec, cfg, progress)
    try:
        start = time.perf_counter()
        conversations = [p.conversation for p in prompts]
        answers, loops = answer_all(gen, conversations, samples, system, cfg.tools, database_url)
        elapsed = time.perf_counter() - start
        settings = dict(gen.settings) | {"seconds": round(elapsed, 2), "samples_per_s": len(prompts) / elapsed}
        if hasattr(gen, "peak_in_flight"):
            settings["achieved_concurrency"] = gen.peak_in_flight
    finally:
        del gen
        gc.collect()
    return answers, settings, loops


def compare(
    a: dict[str, list[float | None]], b: dict[str, list[float | None]], cfg: EvalConfig
) -> dict[str, PairedDiff]:
    """Paired bootstrap CI of (b - a) per metric, over the samples where both have a value."""
    out = {}
    bs = cfg.bootstrap
    for name in a.keys() & b.keys():
        pairs = [(x, y) for x, y in zip(a[name], b[name], strict=True) if x is not None and y is not None]
        if pairs:
            xs, ys = zip(*pairs, strict=True)
            out[name] = paired_bootstrap(xs, ys, confidence=bs.confidence, resamples=bs.resamples, seed=bs.seed)
    return dict(sorted(out.items()))


def mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def main(
    overrides: dict[str, Any] | None = None,
    *,
    test_set: str | None = None,
    models: list[str] | None = None,
    database_url: str | None = None,
    progress: bool = True,
    reuse: bool = False,
) -> EvalSummary:
    """Evaluate one model, or champion vs challenger (`models`: the first is the champion). With `reuse`, an
    earlier finished evaluation of the same models (by identity), test set and config is returned instead."""
    import mlflow
    from fibreflow.core.tracking import setup_mlflow
    from fibreflow.datasets.build import load_data_config
    from fibreflow.datasets.embed import load_embed_config
    from fibreflow.eval.models import identify

    extra = {"test_set": test_set} if test_set else {}
    cfg = load_eval_config((overrides or {}) | extra | ({"models": models} if models else {}))
    gates = load_gates() if len(cfg.models) == 2 else None  # a broken gates file fails before any generation
    path = test_set_path(cfg)
    samples = select(load_test_set(path), cfg)  # a bad test set fails before anything else happens
    setup_mlflow(cfg.experiment)  # before models resolve: `latest`, runs:/ and models:/ read this store
    identity = {role: identify(spec, cfg) for role, spec in zip(ROLES, cfg.models, strict=False)}
    key = eval_key(cfg, path, list(identity.values()))
    if reuse and (earlier := _earlier(key)) is not None:
        return earlier
    system = load_data_config().system_prompt
    prompts = build_prompts(samples, system, cfg.rag, database_url)
    shown = [p.contexts for p in prompts]

    answers: dict[str, list[str]] = {}
    settings: dict[str, dict[str, Any]] = {}
    loops: dict[str, dict[int, Loop]] = {}
    for role, spec in zip(ROLES, cfg.models, strict=False):
        answers[role], settings[role], loops[role] = answers_of(spec, cfg, prompts, samples, progress, system,
                                                                database_url)  # fmt: skip

    embedder = m.embeddings(load_embed_config().model) if cfg.semantic_similarity or cfg.judge.enabled else None
    scores: dict[str, m.Scores] = {}
    judged: dict[str, m.Judged] = {}
    for role, said in answers.items():
        scores[role] = m.accuracy(samples, said) | m.answer_metrics(
            samples, said, embedder if cfg.semantic_similarity else None, progress
        )
        if loops[role]:
            grounded = {i for i, s in enumerate(samples) if s.tools and "grounded" in s.tags}
            # what the caller got, and what the model said (the loop withholds a number from nowhere after a call)
            scores[role]["numbers_grounded"] = [numbers_grounded(loops[role][i]) if i in grounded else None
                                                for i in range(len(samples))]  # fmt: skip
            scores[role]["model_numbers_grounded"] = [
                numbers_grounded(loops[role][i], loops[role][i].said) if i in grounded else None
                for i in range(len(samples))
            ]
            # the loop's answer is the model's own text, not its "I don't know" for a last turn with none
            scores[role]["loop_answered"] = [float(loops[role][i].answered) if i in loops[role] else None
                                             for i in range(len(samples))]  # fmt: skip
        wanted = [x for x in cfg.judge.metrics if x in ANSWER_JUDGED]
        if cfg.judge.enabled and wanted:  # an answer through the tool loop is held to the tool results it read
            seen = [contexts_of(loops[role][i]) if i in loops[role] else shown[i] for i in range(len(samples))]
            judged[role] = m.judge(cfg.judge, samples, said, seen, embedder, wanted, progress)
            scores[role] |= judged[role].scores
    retrieval = m.retrieval_metrics(samples, shown) if any(shown) else {}
    wanted = [x for x in cfg.judge.metrics if x in RETRIEVAL_JUDGED]
    if cfg.judge.enabled and wanted and any(shown):
        judged["retrieval"] = m.judge(cfg.judge, samples, answers["champion"], shown, embedder, wanted, progress)
        retrieval |= {f"llm_{k}": v for k, v in judged["retrieval"].scores.items()}

    diffs = compare(scores["champion"], scores["challenger"], cfg) if "challenger" in scores else {}
    decision = decide(gates, diffs) if gates is not None else None
    summary = _summary(cfg, path, samples, settings, identity, scores, retrieval, judged, diffs, decision)

    parent = mlflow.active_run() is not None
    run_id = os.environ.get("MLFLOW_RUN_ID") if not parent else None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "eval-" + "-vs-".join(cfg.models), nested=parent):
        _log(cfg, samples, prompts, answers, scores, retrieval, judged, diffs, summary)
        if any(loops.values()):
            traces = {role: {samples[i].id: loop.json() | {"said": loop.said, "messages": loop.messages}
                             for i, loop in found.items()}
                      for role, found in loops.items()}  # fmt: skip
            mlflow.log_dict(traces, "eval/tool_loops.json")
        mlflow.set_tag("eval_key", key)
        return summary.model_copy(update={"run_id": mlflow.active_run().info.run_id})


def eval_key(cfg: EvalConfig, path: Path, identities: list[dict[str, str]]) -> str:
    """Same key = same evaluation: the models' identities (not their spec strings), test set bytes, config."""
    body = {"config": cfg.model_dump(mode="json", exclude={"models"}), "identities": identities,
            "test_set": hashlib.sha256(path.read_bytes()).hexdigest()}  # fmt: skip
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _earlier(key: str) -> EvalSummary | None:
    from fibreflow.core.tracking import newest_finished_run

    found = newest_finished_run(f"tags.eval_key = '{key}'")
    if found is None:
        return None
    return load_summary(found.info.run_id).model_copy(update={"reused": True})


def _summary(
    cfg: EvalConfig,
    path: Path,
    samples: list[Sample],
    settings: dict[str, dict[str, Any]],
    identity: dict[str, dict[str, str]],
    scores: dict[str, m.Scores],
    retrieval: m.Scores,
    judged: dict[str, m.Judged],
    diffs: dict[str, PairedDiff],
    decision: Decision | None,
) -> EvalSummary:
    return EvalSummary(
        test_set=str(path),
        test_set_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        samples=len(samples),
        grounded_samples=sum(grounded(s) for s in samples),
        models=dict(zip(ROLES, cfg.models, strict=False)),
        identity=identity,
        labels={role: label(ident) for role, ident in identity.items()},
        generation=settings,
        scores={role: {k: mean(v) for k, v in s.items()} for role, s in scores.items()},
        retrieval={k: mean(v) for k, v in retrieval.items()},
        judge={
            role: JudgeStats(
                calls=j.calls,
                failures={k: dict(c) for k, c in j.failures.items() if c},
                spread={k: mean(v) for k, v in j.spread.items()},
            )
            for role, j in judged.items()
        },
        diff={k: Diff(diff=d.diff, ci_low=d.low, ci_high=d.high, n=d.n) for k, d in diffs.items()},
        gate=Gate(passed=decision.passed, reasons=decision.reasons) if decision is not None else None,
    )


def _log(
    cfg: EvalConfig,
    samples: list[Sample],
    prompts: list[Prompt],
    answers: dict[str, list[str]],
    scores: dict[str, m.Scores],
    retrieval: m.Scores,
    judged: dict[str, m.Judged],
    diffs: dict[str, PairedDiff],
    summary: EvalSummary,
) -> None:
    import mlflow
    from fibreflow.core.tracking import git_sha

    mlflow.log_params(
        {
            "test_set": summary.test_set,
            "test_set_sha256": summary.test_set_sha256,
            "samples": len(samples),
            "rag.mode": cfg.rag.mode,
            "rag.k": cfg.rag.k,
            "judge.model": cfg.judge.model if cfg.judge.enabled else "none",
            "judge.repeats": cfg.judge.repeats if cfg.judge.enabled else 0,
            "bootstrap.confidence": cfg.bootstrap.confidence,
        }
        | {f"{role}.spec": spec for role, spec in summary.models.items()}
        | {f"{role}.gen.{k}": v for role, s in summary.generation.items() for k, v in s.items() if k != "seconds"}
    )
    tags = {"git_sha": git_sha(), "test_set_sha256": summary.test_set_sha256[:16]}
    tags |= {f"{role}.{k}": v for role, ident in summary.identity.items() for k, v in ident.items()}
    tags |= {f"{role}.label": name for role, name in summary.labels.items()}
    if summary.gate is not None:
        tags["gate"] = "passed" if summary.gate.passed else "failed"
    mlflow.set_tags(tags)
    flat = summary.model_metrics()
    for role in summary.scores:
        flat[f"model.{summary.labels[role]}.samples_per_s"] = summary.generation[role]["samples_per_s"]
    flat |= {f"retrieval.{k}": v for k, v in summary.retrieval.items() if v is not None}
    for k, d in diffs.items():
        flat |= {f"diff.{k}": d.diff, f"diff.{k}.ci_low": d.low, f"diff.{k}.ci_high": d.high}
    for role, j in judged.items():
        flat[f"judge.{role}.calls"] = j.calls
        flat |= {f"judge.{role}.failures.{k}": sum(c.values()) for k, c in j.failures.items()}
        flat |= {f"judge.{role}.spread.{k}": v for k, v in summary.judge[role].spread.items() if v is not None}
    if summary.gate is not None:
        flat["gate.passed"] = float(summary.gate.passed)
    mlflow.log_metrics(flat)
    mlflow.log_table(_table(samples, prompts, answers, scores, retrieval), artifact_file="eval/samples.json")
    log_summary(summary)
    if diffs:
        mlflow.log_figure(plot(summary, diffs), "eval/comparison.png")


def _table(
    samples: list[Sample],
    prompts: list[Prompt],
    answers: dict[str, list[str]],
    scores: dict[str, m.Scores],
    retrieval: m.Scores,
) -> dict[str, list[Any]]:
    table: dict[str, list[Any]] = {
        "id": [s.id for s in samples],
        "tags": [",".join(s.tags) for s in samples],
        "question": [s.question for s in samples],
        "reference": [s.reference for s in samples],
        "retrieved": [json.dumps(p.record_ids) for p in prompts],
    }
    table |= {f"{role}_answer": a for role, a in answers.items()}
    table |= {f"{role}_{k}": v for role, s in scores.items() for k, v in s.items()}
    table |= {f"retrieval_{k}": v for k, v in retrieval.items()}
    return table


def plot(summary: EvalSummary, diffs: dict[str, PairedDiff]) -> Any:
    """Left: challenger - champion per metric with its CI (a forest plot). Right: both means per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(diffs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6), sharey=True)
    ys = range(len(names))
    for y, name in zip(ys, names, strict=True):
        d = diffs[name]
        color = "#2a7" if d.low > 0 else "#c33" if d.high < 0 else "#777"
        left.errorbar(d.diff, y, xerr=[[d.diff - d.low], [d.high - d.diff]], fmt="o", color=color, capsize=3)
        right.barh(y + 0.2, d.a, 0.4, color="#999", label="champion" if y == 0 else None)
        right.barh(y - 0.2, d.b, 0.4, color="#27a", label="challenger" if y == 0 else None)
    left.axvline(0, color="black", lw=0.8)
    left.set_yticks(list(ys), [f"{n} (n={diffs[n].n})" for n in names])
    left.invert_yaxis()
    left.set_xlabel("challenger - champion (95% CI)")
    right.set_xlabel("mean")
    right.legend(loc="lower right")
    gate = summary.gate
    verdict = ("gate passed" if gate.passed else "gate failed") if gate is not None else ""
    fig.suptitle(f"{summary.labels['challenger']} vs {summary.labels['champion']}  {verdict}")
    fig.tight_layout()
    return fig
