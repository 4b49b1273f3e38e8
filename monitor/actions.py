"""What a regression run leaves behind and sets off: its MLflow run (metrics named after the version, the rows, a
plot of the version's series), tags on the version, and for a `regressed` or `unmeasured` run an alert (a webhook
with a JSON body and a Slack-compatible `text`) and, for a regressed arm the policy names, the rollback of
@champion through the registry, with the run recorded as its reason."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fibreflow.core.tracking import run_link
from fibreflow.eval.summary import label
from fibreflow.eval.testset import Sample
from fibreflow.monitor.config import MonitoringConfig

if TYPE_CHECKING:
    from fibreflow.monitor.regress import Regression

log = logging.getLogger("fibreflow.monitor")
Act = Callable[[MonitoringConfig, "Regression", str], None]


def version_label(name: str, version: str) -> str:
    return label({"kind": "registered", "registered_model": name, "version": version})


def earlier_flags(cfg: MonitoringConfig, name: str, version: str, arm: str) -> dict[str, list[bool]]:
    """Per policy metric, whether each earlier measured run of this version and arm was below tolerance."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=[cfg.experiment],
        filter_string=f"tags.registered_model = '{name}' and tags.model_version = '{version}' and tags.arm = '{arm}'"
        " and tags.status != 'unmeasured'",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )
    return {
        m: [r.data.tags.get(f"below.{m}") == "true" for r in runs if f"below.{m}" in r.data.tags] for m in cfg.policy
    }


def log_run(
    cfg: MonitoringConfig,
    result: Regression,
    name: str,
    sha: str,
    answers: list[str],
    suite: list[Sample],
    live: dict[str, list[float | None]] | None = None,
    *,
    actions: Act | None,
) -> Regression:
    """The run in `fibreflow-regression`; then the actions (`act`) for a run that is not ok."""
    import mlflow

    with mlflow.start_run(run_name=f"regress-{result.arm}-v{result.version or 'none'}") as run:
        result.run_id = run.info.run_id
        tags = {"registered_model": name, "model_version": result.version or "", "arm": result.arm,
                "status": result.status, "suite_sha256": sha, "baseline_eval_run_id": result.baseline_run_id or "",
                "reasons": " | ".join(result.reasons)[:4000]}  # fmt: skip
        tags |= {f"below.{v.metric}": str(v.below).lower() for v in result.verdicts}
        mlflow.set_tags(tags)
        if result.version is not None and result.status != "unmeasured":
            tag = version_label(name, result.version)
            metrics = {f"model.{tag}.{m}": s for m, s in result.scores.items()}
            metrics |= {f"baseline.{m}": s for m, s in result.baseline.items()}
            for v in result.verdicts:
                metrics |= {f"diff.{v.metric}": v.diff.diff, f"diff.{v.metric}.ci_low": v.diff.low,
                            f"diff.{v.metric}.ci_high": v.diff.high}  # fmt: skip
            mlflow.log_metrics(metrics)
            mlflow.log_figure(plot_series(cfg, name, result), "regression/series.png")
        if answers:
            rows: dict[str, list[Any]] = {"id": [s.id for s in suite], "question": [s.question for s in suite],
                                          "answer": answers}  # fmt: skip
            rows |= {f"live_{m}": v for m, v in (live or {}).items()}
            mlflow.log_table(rows, artifact_file="regression/rows.json")
        mlflow.log_dict(result.summary(), "regression/summary.json")
        if result.status != "ok" and actions is not None:
            actions(cfg, result, run_link(run))
            mlflow.set_tags({f"action.{k}": v for k, v in result.actions.items()})
    if result.version is not None:
        client = mlflow.MlflowClient()
        client.set_model_version_tag(name, result.version, f"regression.{result.arm}.last_run_id", result.run_id)
        client.set_model_version_tag(name, result.version, f"regression.{result.arm}.last_status", result.status)
    return result


def plot_series(cfg: MonitoringConfig, name: str, result: Regression) -> Any:
    """This version's live scores over its regression runs (this one last), the offline baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    assert result.version is not None
    tag = version_label(name, result.version)
    runs = mlflow.search_runs(
        experiment_names=[cfg.experiment],
        filter_string=f"tags.model_version = '{result.version}' and tags.arm = '{result.arm}'",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, metric in enumerate(sorted(result.scores)):
        points = [r.data.metrics.get(f"model.{tag}.{metric}") for r in runs if r.info.run_id != result.run_id]
        series = [p for p in points if p is not None] + [result.scores[metric]]
        color = f"C{i}"
        ax.plot(range(len(series)), series, marker="o", color=color, label=metric)
        ax.axhline(result.baseline[metric], color=color, linestyle="--", linewidth=0.8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(f"regression runs of {tag} on arm {result.arm} (dashed: offline baseline)")
    ax.set_title(f"{tag}: {result.status}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def act(cfg: MonitoringConfig, result: Regression, url: str) -> None:
    """Roll back first (where the policy says so), then alert: the alert says what was done."""
    if result.status == "regressed" and result.arm in cfg.rollback and result.version is not None:
        from fibreflow.core.errors import FibreFlowError
        from fibreflow.registry.registry import rollback

        why = f"regression run {result.run_id}: {'; '.join(result.reasons)}"[:500]
        try:
            back = rollback(reason=why, expected=result.version)
            result.actions["rollback"] = f"@champion v{back['was']} -> v{back['champion']}"
        except FibreFlowError as exc:
            result.actions["rollback"] = f"not done: {exc}"
    result.actions["alert"] = alert(cfg, result, url)


def alert(cfg: MonitoringConfig, result: Regression, url: str) -> str:
    """POST the run to the webhook; what happened, for the record (never raises)."""
    import httpx

    if not cfg.alert.webhook_url:
        return "no webhook configured"
    who = f"{result.arm} (v{result.version})" if result.version else result.arm
    text = f"FibreFlow regression check: {who} is {result.status.upper()}. " + "; ".join(result.reasons)
    if "rollback" in result.actions:
        text += f". Rollback: {result.actions['rollback']}"
    body = result.summary() | {"text": f"{text}. {url}", "run_url": url}
    try:
        resp = httpx.post(cfg.alert.webhook_url, json=body, timeout=cfg.alert.timeout_s)
    except httpx.HTTPError as exc:
        log.warning("alert not delivered (%s)", exc)
        return f"not delivered: {type(exc).__name__}"
    return f"delivered ({resp.status_code})" if resp.status_code < 400 else f"refused ({resp.status_code})"
