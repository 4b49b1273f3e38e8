"""`fibreflow regress`: the frozen regression suite through the live router, as a real client, once per arm, against
the offline evaluation of the version that arm serves.

For each arm (forced by header, greedy): the version the registry names for it -> the evaluation that judged that
version (its promotion's, else the one registered with it) -> the suite's rows asked exactly as that evaluation
asked them (same prompts, retrieval settings and answer length) -> scored the same way -> paired by row id with
that evaluation's scores -> the paired bootstrap CI of (live - baseline) per metric -> the policy's decision.
This catches what offline evaluation cannot: the served model differing from the evaluated one (a wrong adapter, a
QLoRA adapter on the wrong base, a serving config change, a poisoned cache, a broken chat template). Endpoint
failures, or an arm serving another version than the registry names, make the run `unmeasured`, never a score.

Each arm's run is an MLflow run in `fibreflow-regression` whose metrics are named after the version
(`model.fibreflow-assistant-v3.accuracy`), so the MLflow UI shows one series per version over time; a plot of
that series is logged with every run. One regression run at a time (a Postgres advisory lock): a monitor and a
manual run never overlap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fibreflow.core.config import atomic_write, resolve_path
from fibreflow.core.errors import FibreFlowError
from fibreflow.eval.stats import PairedDiff, paired_bootstrap
from fibreflow.eval.testset import Sample, load_test_set
from fibreflow.monitor.config import MonitoringConfig, load_monitoring_config
from fibreflow.monitor.decide import MetricVerdict, Status, decide

LOCK = "fibreflow-regress"
VERSION_HEADER, ARM_HEADER = "x-fibreflow-model-version", "x-fibreflow-arm"


class RegressionError(FibreFlowError):
    """The regression suite cannot be run as configured (no suite, a changed suite, nothing to compare with)."""


@dataclass
class Regression:
    """One arm's regression run."""

    arm: str
    version: str | None
    status: Status
    reasons: list[str]
    verdicts: list[MetricVerdict] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # live means
    baseline: dict[str, float] = field(default_factory=dict)  # the offline evaluation's means, same rows
    run_id: str | None = None
    baseline_run_id: str | None = None
    actions: dict[str, str] = field(default_factory=dict)  # alert / rollback: what happened

    def summary(self) -> dict[str, Any]:
        diffs = {v.metric: {"diff": v.diff.diff, "ci_low": v.diff.low, "ci_high": v.diff.high, "n": v.diff.n,
                            "live": v.diff.b, "baseline": v.diff.a, "regressed": v.regressed}
                 for v in self.verdicts}  # fmt: skip
        return {"arm": self.arm, "version": self.version, "status": self.status, "reasons": self.reasons,
                "metrics": diffs, "run_id": self.run_id, "baseline_run_id": self.baseline_run_id,
                "actions": self.actions}  # fmt: skip


# ---- the suite -----------------------------------------------------------------------------------------------


def freeze(cfg: MonitoringConfig, eval_run_id: str | None = None) -> tuple[Path, str]:
    """Write the suite: the rows the evaluation `eval_run_id` (default: the one that judged @champion) scored, from
    the test set it read (checked unchanged). Returns (path, sha256) to pin in configs/monitoring.yaml."""
    import hashlib

    from fibreflow.eval.summary import load_summary

    run_id = eval_run_id or _evaluation_of(_registered_name(), _alias_version("champion"))
    summary = load_summary(run_id)
    source = Path(summary.test_set)
    if not source.is_file() or hashlib.sha256(source.read_bytes()).hexdigest() != summary.test_set_sha256:
        raise RegressionError(f"the test set of evaluation {run_id} ({source}) is gone or changed: freeze from another")
    ids = _table(run_id)["id"]
    rows = {json.loads(line)["id"]: line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()}
    lines = "".join(rows[i] + "\n" for i in ids)  # the test set's own lines, in the evaluation's order
    path = resolve_path(cfg.suite.path)
    atomic_write(path, lines)
    return path, hashlib.sha256(lines.encode()).hexdigest()


def load_suite(cfg: MonitoringConfig) -> tuple[list[Sample], str]:
    """The frozen suite and its sha256; frozen now when it does not exist and no hash is pinned."""
    import hashlib

    path = resolve_path(cfg.suite.path)
    if not path.is_file():
        if cfg.suite.sha256 is not None:
            raise RegressionError(f"the regression suite {path} is missing; `fibreflow freeze-suite` writes it")
        path, _ = freeze(cfg)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    if cfg.suite.sha256 is not None and sha != cfg.suite.sha256:
        raise RegressionError(
            f"the regression suite {path} has sha256 {sha[:16]}…, configs/monitoring.yaml pins "
            f"{cfg.suite.sha256[:16]}…: restore it, or freeze a new one (`fibreflow freeze-suite`) and pin its hash"
        )
    return load_test_set(path), sha


# ---- what the registry and the offline evaluation say ----------------------------------------------------------


def _registered_name() -> str:
    from fibreflow.registry.registry import load_registry_config

    return load_registry_config().name


def _alias_version(alias: str) -> str:
    import mlflow
    from fibreflow.registry.watch import UNSET

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(_registered_name(), alias).version)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in UNSET:
            raise RegressionError(f"@{alias} is not set: nothing is served on that arm") from None
        raise RegressionError(f"the registry could not be read ({str(exc).splitlines()[0][:200]})") from None


def _evaluation_of(name: str, version: str) -> str:
    """The evaluation that judged `version`: its promotion's, else the one it was registered with."""
    import mlflow

    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    run_id = tags.get("promotion.eval_run_id") or tags.get("eval_run_id")
    if not run_id:
        raise RegressionError(f"{name} v{version} was never evaluated offline: nothing to compare the live one with")
    return run_id


def _table(run_id: str) -> dict[str, list[Any]]:
    import mlflow

    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/eval/samples.json")
    return {c: [row[i] for row in table["data"]] for i, c in enumerate(table["columns"])}


@dataclass(frozen=True)
class Baseline:
    run_id: str
    role: str  # champion or challenger: the version's role in that evaluation
    scores: dict[str, dict[str, float | None]]  # metric -> row id -> score
    rag: dict[str, str]  # the retrieval settings it asked with
    max_new_tokens: int


def baseline(name: str, version: str) -> Baseline:
    """The offline scores of `version`: its role in the evaluation that judged it, found by its training run."""
    import mlflow
    from fibreflow.eval.summary import load_summary

    client = mlflow.MlflowClient()
    run_id = _evaluation_of(name, version)
    trained = client.get_model_version(name, version).tags.get("training_run_id")
    summary = load_summary(run_id)
    role = next((r for r, ident in summary.identity.items() if ident.get("run_id") == trained), None)
    if role is None:
        raise RegressionError(f"evaluation {run_id} did not score {name} v{version}'s weights (run {trained})")
    table, params = _table(run_id), client.get_run(run_id).data.params
    prefix = f"{role}_"
    scores = {c.removeprefix(prefix): dict(zip(table["id"], v, strict=True))
              for c, v in table.items() if c.startswith(prefix) and c != f"{role}_answer"}  # fmt: skip
    rag = {"mode": params.get("rag.mode", "retrieve"), "k": params.get("rag.k", "4")}
    return Baseline(run_id, role, scores, rag, int(params.get(f"{role}.gen.max_new_tokens", "64")))


# ---- one arm, live ----------------------------------------------------------------------------------------------


def measure(cfg: MonitoringConfig, arm: str, suite: list[Sample], base: Baseline) -> tuple[list[str] | None, Any, str]:
    """(answers, the generator that asked, why unmeasured or "") of `arm` through the router."""
    import os

    from fibreflow.datasets.build import load_data_config
    from fibreflow.eval.config import Rag, load_eval_config
    from fibreflow.eval.generators import EndpointGenerator, GenerationError
    from fibreflow.eval.loop import answer_all
    from fibreflow.eval.rag import build_prompts

    r = cfg.router
    key = os.environ.get(r.api_key_env, "") if r.api_key_env else ""
    rag = Rag(mode=base.rag["mode"], k=int(base.rag["k"]))  # type: ignore[arg-type]
    system = load_data_config().system_prompt
    prompts = build_prompts(suite, system, rag)
    gen = EndpointGenerator(f"router:{arm}", r.base_url, r.model, key or "none", concurrency=r.concurrency,
                            timeout_s=r.timeout_s, retries=r.retries, max_new_tokens=base.max_new_tokens,
                            headers={ARM_HEADER: arm}, tally_header=VERSION_HEADER)  # fmt: skip
    try:  # rows with `tools: true` through the tool loop, the router answering each turn, the tools on the records
        answers, _ = answer_all(gen, [p.conversation for p in prompts], suite, system, load_eval_config().tools)
        return answers, gen, ""
    except GenerationError as exc:
        return None, gen, f"the router did not answer every question: {exc}"


def regress_arm(cfg: MonitoringConfig, arm: str, suite: list[Sample], sha: str, actions: bool) -> Regression:
    from fibreflow.eval.metrics import accuracy
    from fibreflow.monitor.actions import act, earlier_flags, log_run

    name = _registered_name()
    try:
        version = _alias_version(arm)
        base = baseline(name, version)
    except RegressionError as exc:
        result = Regression(arm, None, "unmeasured", [str(exc)])
        return log_run(cfg, result, name, sha, [], suite, actions=act if actions else None)
    answers, gen, why = measure(cfg, arm, suite, base)
    served = {v for v in gen.tally if v}
    if not why and served != {version}:
        why = f"arm {arm} answered as {', '.join(sorted(served)) or 'nothing'}, the registry names v{version}"
    if why:
        result = Regression(arm, version, "unmeasured", [why], baseline_run_id=base.run_id)
        return log_run(cfg, result, name, sha, answers or [], suite, actions=act if actions else None)
    live = accuracy(suite, answers or [])
    diffs = paired(live, suite, base, cfg)
    status, verdicts = decide(diffs, earlier_flags(cfg, name, version, arm), cfg.policy)
    reasons = [v.reason for v in verdicts if v.below] or ["every metric within tolerance"]
    result = Regression(arm, version, status, reasons, verdicts, {m: d.b for m, d in diffs.items()},
                        {m: d.a for m, d in diffs.items()}, None, base.run_id)  # fmt: skip
    return log_run(cfg, result, name, sha, answers or [], suite, live, actions=act if actions else None)


def paired(live: dict[str, list[float | None]], suite: list[Sample], base: Baseline, cfg: MonitoringConfig
           ) -> dict[str, PairedDiff]:  # fmt: skip
    """live - baseline per metric, over the rows both scored, paired by row id."""
    out = {}
    for metric, values in live.items():
        offline = base.scores.get(metric, {})
        pairs = [(offline.get(s.id), v) for s, v in zip(suite, values, strict=True)]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if pairs:
            a, b = zip(*pairs, strict=True)
            out[metric] = paired_bootstrap(a, b, confidence=cfg.confidence, resamples=cfg.bootstrap_resamples)
    return out


def main(overrides: dict[str, Any] | None = None, *, arms: list[str] | None = None, actions: bool = True
         ) -> list[Regression]:  # fmt: skip
    """Every configured arm (or `arms`), one at a time, under the regression lock (`LockBusy` when another runs)."""
    from fibreflow.core.db import advisory_lock, open_db
    from fibreflow.core.tracking import setup_mlflow

    cfg = load_monitoring_config(overrides)
    setup_mlflow(cfg.experiment)
    with open_db() as conn, advisory_lock(conn, LOCK, 0, "a regression run (`fibreflow regress` or the monitor)"):
        suite, sha = load_suite(cfg)
        return [regress_arm(cfg, arm, suite, sha, actions) for arm in arms or cfg.router.arms]


def dumps(results: list[Regression]) -> str:
    return json.dumps([r.summary() for r in results], indent=2)
