"""`fibreflow trace <response id | model version>`: one command that walks a response's lineage.

The audit row (caller, arm, version, latency, tokens, feedback) -> the registered version (aliases, tags) -> the
training run that made its weights (config hash, git commit, parameters) -> the dataset version it trained on
(its manifest: splits, source queries, the database snapshot) -> the evaluation that promoted it and the gate's
reasons -> every later regression run of that version. A hop that cannot be followed is named in `gaps` with the
reason; the walk never stops at the first gap. Every MLflow object comes with a link for the MLflow UI.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from fibreflow.core.config import Strict
from fibreflow.core.errors import FibreFlowError
from fibreflow.datasets.manifest import DatasetManifest
from pydantic import Field

VERSION = re.compile(r"^(?:v?(?P<v>\d+)|@(?P<alias>\w+)|models:/(?P<name>[^/@]+)(?:/(?P<mv>\d+)|@(?P<ma>\w+)))$")
AUDIT = """
SELECT a.at, a.caller, a.key_id, k.name, a.endpoint, a.model, a.arm, a.model_version, a.status, a.latency_ms,
       a.prompt_tokens, a.completion_tokens, a.cache
FROM request_audit a LEFT JOIN api_keys k ON k.id = a.key_id WHERE a.response_id = %s ORDER BY a.at
"""
FEEDBACK = """
SELECT coalesce(k.name, f.caller), f.score, f.thumbs, f.comment, f.at
FROM feedback f LEFT JOIN api_keys k ON k.id = f.caller WHERE f.response_id = %s ORDER BY f.at
"""


class TraceError(FibreFlowError):
    """What was asked for cannot be found at all (no such response, no such version)."""


class Served(Strict):
    """The request that produced the response (its first answered audit row) and what followed it."""

    response_id: str
    at: dt.datetime
    caller: str  # the client's address
    key_id: str | None
    key_name: str | None
    endpoint: str
    model: str | None
    arm: str | None
    model_version: str | None
    status: int
    latency_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    cache: str | None
    served_again: int  # later audit rows naming the same response (cache hits, feedback calls)
    feedback: list[dict[str, Any]]


class Version(Strict):
    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    link: str


class Training(Strict):
    run_id: str
    link: str
    started: dt.datetime | None
    tags: dict[str, str]  # the lineage tags: config_hash, git_sha, base_model, dataset_version
    params: dict[str, str]
    metrics: dict[str, float]


class Dataset(Strict):
    version: str
    source: str  # where the manifest was read: the training run's artifact
    manifest: DatasetManifest


class Evaluation(Strict):
    decision: str
    decision_run_id: str | None
    decision_link: str | None
    eval_run_id: str
    eval_link: str
    against: str | None  # the champion it was judged against ("base" for the first)
    reasons: list[str]
    scores: dict[str, dict[str, float | None]]  # role -> metric -> mean
    diff: dict[str, dict[str, float]]  # metric -> diff, ci_low, ci_high, n


class RegressionRun(Strict):
    run_id: str
    link: str
    at: dt.datetime
    arm: str
    status: str
    reasons: str
    diff: dict[str, float]


class Trace(Strict):
    query: str
    response: Served | None = None
    version: Version | None = None
    training: Training | None = None
    dataset: Dataset | None = None
    promotion: Evaluation | None = None
    regressions: list[RegressionRun] = Field(default_factory=list)
    gaps: list[str] = Field(default_factory=list)


# ---- the hops ---------------------------------------------------------------------------------------------------


def served(response_id: str) -> Served:
    from fibreflow.core.db import open_db

    with open_db() as conn:
        if conn.execute("SELECT to_regclass('request_audit')").fetchone()[0] is None:
            raise TraceError("this database has no audit log (request_audit): `fibreflow db migrate`, and serve with "
                             "router.audit.enabled")  # fmt: skip
        rows = conn.execute(AUDIT, (response_id,)).fetchall()
        votes = conn.execute(FEEDBACK, (response_id,)).fetchall()
    answered = [r for r in rows if r[8] == 200 and r[6] is not None]
    if not answered:
        raise TraceError(f"no audit row answered with response id {response_id!r}: audit may be off "
                         "(router.audit.enabled) or the id is not one this router served")  # fmt: skip
    r = answered[0]
    return Served(response_id=response_id, at=r[0], caller=r[1], key_id=r[2], key_name=r[3], endpoint=r[4],
                  model=r[5], arm=r[6], model_version=r[7], status=r[8], latency_ms=r[9], prompt_tokens=r[10],
                  completion_tokens=r[11], cache=r[12], served_again=len(rows) - 1,
                  feedback=[{"caller": v[0], "score": v[1], "thumbs": v[2], "comment": v[3], "at": v[4].isoformat()}
                            for v in votes])  # fmt: skip


def version(name: str, number: str) -> Version:
    import mlflow
    from fibreflow.core.tracking import version_link

    try:
        mv = mlflow.MlflowClient().get_model_version(name, number)
    except mlflow.exceptions.MlflowException:
        raise TraceError(f"{name} has no version {number} in {mlflow.get_tracking_uri()}") from None
    return Version(name=name, version=number, aliases=sorted(mv.aliases), tags=dict(mv.tags),
                   link=version_link(name, number))  # fmt: skip


def training(run_id: str) -> Training:
    import mlflow
    from fibreflow.core.tracking import run_link

    run = mlflow.get_run(run_id)
    lineage = ("config_hash", "git_sha", "base_model", "base_model_path", "dataset_version")
    started = dt.datetime.fromtimestamp(run.info.start_time / 1000, dt.UTC) if run.info.start_time else None
    return Training(run_id=run_id, link=run_link(run), started=started,
                    tags={k: run.data.tags[k] for k in lineage if k in run.data.tags},
                    params=dict(run.data.params), metrics=dict(run.data.metrics))  # fmt: skip


def dataset(run_id: str) -> Dataset:
    import mlflow

    text = mlflow.artifacts.load_text(f"runs:/{run_id}/datasets/manifest.json")
    manifest = DatasetManifest.model_validate_json(text)
    return Dataset(version=manifest.version, source=f"runs:/{run_id}/datasets/manifest.json", manifest=manifest)


def promotion(tags: dict[str, str]) -> Evaluation:
    import mlflow
    from fibreflow.core.tracking import run_link
    from fibreflow.eval.summary import load_summary

    eval_run_id = tags.get("promotion.eval_run_id") or tags["eval_run_id"]
    decision_run = tags.get("promotion.decision_run_id")
    summary = load_summary(eval_run_id)
    against = None
    if decision_run:
        against = mlflow.get_run(decision_run).data.tags.get("champion_version")
    reasons = summary.gate.reasons if summary.gate else []
    if "promotion.reasons" in tags:  # the gate as the promotion applied it
        reasons = [r for r in tags["promotion.reasons"].split(" | ") if r]
    return Evaluation(
        decision=tags.get("promotion.decision", "evaluated, never promoted"),
        decision_run_id=decision_run,
        decision_link=run_link(mlflow.get_run(decision_run)) if decision_run else None,
        eval_run_id=eval_run_id,
        eval_link=run_link(mlflow.get_run(eval_run_id)),
        against=against,
        reasons=reasons,
        scores=summary.scores,
        diff={k: {"diff": d.diff, "ci_low": d.ci_low, "ci_high": d.ci_high, "n": d.n} for k, d in summary.diff.items()},
    )


def regressions(name: str, number: str) -> list[RegressionRun]:
    import mlflow
    from fibreflow.core.tracking import run_link
    from fibreflow.monitor.config import load_monitoring_config

    runs = mlflow.search_runs(
        experiment_names=[load_monitoring_config().experiment],
        filter_string=f"tags.registered_model = '{name}' and tags.model_version = '{number}'",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )
    return [RegressionRun(run_id=r.info.run_id, link=run_link(r), at=dt.datetime.fromtimestamp(r.info.start_time / 1000,
                          dt.UTC), arm=r.data.tags.get("arm", ""), status=r.data.tags.get("status", ""),
                          reasons=r.data.tags.get("reasons", ""),
                          diff={k: v for k, v in r.data.metrics.items() if k.startswith("diff.")})
            for r in runs]  # fmt: skip


# ---- the walk ---------------------------------------------------------------------------------------------------


def resolve(name: str, query: str) -> str | None:
    """The version number `query` names (`3`, `v3`, `@champion`, `models:/<name>/3`, `models:/<name>@champion`), or
    None when it is not a version (then it is a response id)."""
    import mlflow

    m = VERSION.match(query.strip())
    if m is None:
        return None
    if m["name"] and m["name"] != name:
        raise TraceError(f"{query}: this project registers {name}, not {m['name']}")
    number, alias = m["v"] or m["mv"], m["alias"] or m["ma"]
    if number:
        return number
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        raise TraceError(f"@{alias} is not set on {name}") from None


def trace(query: str) -> Trace:
    """The lineage of a response id or a model version, as far as the records reach."""
    from fibreflow.core.tracking import setup_mlflow
    from fibreflow.monitor.config import load_monitoring_config
    from fibreflow.registry.registry import load_registry_config

    name = load_registry_config().name
    setup_mlflow(load_monitoring_config().experiment)
    hops: dict[str, Any] = {"query": query}
    gaps: list[str] = []
    number = resolve(name, query)
    if number is None:
        response = hops["response"] = served(query)
        number = response.model_version
        if number is None or not number.isdigit():
            gaps.append(f"arm {response.arm} served {number or 'no version'}, not a registered version of {name}: "
                        "the lineage ends at the audit row")  # fmt: skip
            return Trace(**hops, gaps=gaps)
    found = hops["version"] = version(name, number)
    run_id = found.tags.get("training_run_id")
    if run_id is None:
        gaps.append(f"v{number} has no training_run_id tag: its registration never finished (`fibreflow register`)")
    else:
        trained = hops["training"] = training(run_id)
        try:
            hops["dataset"] = dataset(run_id)
        except Exception as exc:  # an artifact that is not there: MLflow raises its store's own error types
            gaps.append(f"training run {run_id} logged no dataset manifest (datasets/manifest.json: "
                        f"{type(exc).__name__}); its dataset_version tag says "
                        f"{trained.tags.get('dataset_version', 'nothing')}")  # fmt: skip
    if "promotion.eval_run_id" in found.tags or "eval_run_id" in found.tags:
        hops["promotion"] = promotion(found.tags)
    else:
        gaps.append(f"v{number} was never evaluated against a champion (`fibreflow promote` records that)")
    return Trace(**hops, regressions=regressions(name, number), gaps=gaps)


# ---- for people -------------------------------------------------------------------------------------------------


def render(t: Trace) -> str:
    """The trace as text, one block per hop, each with its MLflow link."""
    lines: list[str] = []
    add = lines.append
    if (r := t.response) is not None:
        tokens = f"{r.prompt_tokens}+{r.completion_tokens} tokens" if r.prompt_tokens is not None else "tokens unknown"
        add(f"Response {r.response_id}, {r.at:%Y-%m-%d %H:%M:%S %Z}")
        add(f"  key {r.key_name} ({r.key_id}) from {r.caller}, {r.endpoint}, model {r.model}" if r.key_id else
            f"  no key, from {r.caller}, {r.endpoint}, model {r.model}")  # fmt: skip
        add(f"  arm {r.arm} -> version {r.model_version}, status {r.status}, {r.latency_ms:.0f} ms, {tokens}, "
            f"cache {r.cache or 'off'}; named again by {r.served_again} later request(s)")  # fmt: skip
        for f in r.feedback:
            vote = f"score {f['score']:.2f} {f['thumbs'] or ''} {f['comment'] or ''}".rstrip()
            add(f"  feedback from {f['caller']}: {vote}")
    if (v := t.version) is not None:
        aliases = f" [@{', @'.join(v.aliases)}]" if v.aliases else ""
        add(f"Model version {v.name} v{v.version}{aliases}  {v.link}")
        keep = ("base_model", "quantization", "dataset_version", "previous_champion", "rolled_back")
        add("  " + ", ".join(f"{k} {v.tags[k]}" for k in keep if v.tags.get(k)))
        for k in sorted(k for k in v.tags if k.startswith("regression.") and k.endswith("last_status")):
            add(f"  {k}: {v.tags[k]}")
    if (tr := t.training) is not None:
        add(f"Training run {tr.run_id}, started {tr.started:%Y-%m-%d %H:%M %Z}  {tr.link}" if tr.started else
            f"Training run {tr.run_id}  {tr.link}")  # fmt: skip
        add("  " + ", ".join(f"{k} {val}" for k, val in tr.tags.items()))
        add(f"  {len(tr.params)} parameters, {len(tr.metrics)} metrics (all of them with --json)")
    if (d := t.dataset) is not None:
        m = d.manifest
        add(f"Dataset {d.version} (manifest: {d.source})")
        for ds, splits in m.datasets.items():
            add(f"  {ds}: " + ", ".join(f"{s} {f.rows} rows" for s, f in splits.items()))
        add(f"  accuracy test set {m.accuracy_test_set.rows} rows; source queries: {', '.join(m.source_queries)}")
        db = m.database
        add(f"  database {db.url} (PostgreSQL {db.server_version}, schema {db.schema_version}), snapshot {db.snapshot}")
        add("  tables: " + ", ".join(f"{k} {n}" for k, n in db.table_rows.items()))
        if db.data_source:
            add("  data source: " + ", ".join(f"{k} {v}" for k, v in db.data_source.items() if not isinstance(v, dict)))
    if (p := t.promotion) is not None:
        link = f"  {p.decision_link}" if p.decision_link else ""
        add(f"Promotion: {p.decision} against {p.against or 'unknown'} (run {p.decision_run_id}){link}")
        add(f"  evaluation run {p.eval_run_id}  {p.eval_link}")
        for metric, diff in p.diff.items():
            add(f"  {metric}: challenger - champion {diff['diff']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]"
                f", n={diff['n']:.0f}")  # fmt: skip
        lines.extend(f"  gate: {reason}" for reason in p.reasons)
    if t.version is not None:
        add(f"Regression runs of v{t.version.version}: {len(t.regressions)}")
        for g in t.regressions:
            add(f"  {g.at:%Y-%m-%d %H:%M} {g.arm} {g.status}: {g.reasons[:120]}  {g.link}")
    lines.extend(f"Gap: {gap}" for gap in t.gaps)
    return "\n".join(lines)
