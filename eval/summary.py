"""The evaluation summary: what an evaluation measured, per model and paired, and what the gates said. Logged as
`eval/summary.json` with the evaluation's MLflow run and read back only through this module (promotion, the
pipeline's report, monitoring).

Each model's scores are also logged as MLflow metrics named after the model, not its role in this run:
`model.<label>.<metric>`, e.g. `model.fibreflow-assistant-v3.accuracy`. The same version evaluated again (as
champion one day, challenger another, or monitored) adds to the same series.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fibreflow.core.config import Strict
from fibreflow.eval.stats import PairedDiff
from pydantic import Field

ARTIFACT = "eval/summary.json"


class Diff(Strict):
    """challenger - champion over the paired samples, with its bootstrap CI."""

    diff: float
    ci_low: float
    ci_high: float
    n: int


class Gate(Strict):
    passed: bool
    reasons: list[str]


class JudgeStats(Strict):
    calls: int
    failures: dict[str, dict[str, int]]  # metric -> failure kind -> count
    spread: dict[str, float | None]


class EvalSummary(Strict):
    run_id: str | None = None  # the evaluation's MLflow run (None until logged)
    reused: bool = False  # returned from an earlier identical evaluation instead of run again
    test_set: str
    test_set_sha256: str
    samples: int
    grounded_samples: int
    models: dict[str, str]  # role (champion, challenger) -> the spec given
    identity: dict[str, dict[str, str]]  # role -> what exactly was evaluated
    labels: dict[str, str]  # role -> the model's stable label (its metric names)
    generation: dict[str, dict[str, Any]]  # role -> generation settings and throughput
    scores: dict[str, dict[str, float | None]]  # role -> metric -> mean
    retrieval: dict[str, float | None]
    judge: dict[str, JudgeStats] = Field(default_factory=dict)
    diff: dict[str, Diff] = Field(default_factory=dict)
    gate: Gate | None = None

    def diffs(self) -> dict[str, PairedDiff]:
        """The paired differences, to judge them (again) with the gates."""
        a, b = self.scores["champion"], self.scores["challenger"]
        return {k: PairedDiff(a[k] or 0.0, b[k] or 0.0, d.diff, d.ci_low, d.ci_high, d.n) for k, d in self.diff.items()}

    def model_metrics(self) -> dict[str, float]:
        """Every model's scores under its stable label: `model.<label>.<metric>`."""
        return {
            f"model.{self.labels[role]}.{k}": v
            for role, scores in self.scores.items()
            for k, v in scores.items()
            if v is not None
        }


def label(identity: dict[str, str]) -> str:
    """A model's stable name for metric series: the same weights get the same label in every run."""
    kind = identity.get("kind")
    if kind == "registered":
        name = f"{identity['registered_model']}-v{identity['version']}"
    elif kind == "run":
        name = f"run-{identity['run_id'][:12]}"
    elif kind == "base":
        name = f"base-{identity['base_model']}"
    elif kind == "endpoint":
        name = f"endpoint-{identity['model']}"
    else:  # a local folder: named by its path
        name = f"folder-{hashlib.sha256(identity.get('path', '').encode()).hexdigest()[:12]}"
    return name + ("-vllm" if identity.get("backend") == "vllm" else "")


def load_summary(run_id: str) -> EvalSummary:
    import mlflow

    data = mlflow.artifacts.load_dict(f"runs:/{run_id}/{ARTIFACT}")
    return EvalSummary.model_validate(data | {"run_id": run_id})


def log_summary(summary: EvalSummary) -> None:
    """Under the evaluation's active MLflow run."""
    import mlflow

    mlflow.log_dict(summary.model_dump(mode="json", exclude={"run_id", "reused"}), ARTIFACT)
