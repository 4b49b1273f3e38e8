"""`fibreflow ab report`: which arm of a live experiment is better, from what the router recorded.

Per arm, over the requests the split sent it (QA-forced ones are not user traffic and are left out; a request the
fallback answered instead still counts against the arm the split chose): the feedback score (votes: a score or
thumbs, 0..1; the arena's votes too), the thumbs-up rate, the error rate (5xx answers and fallbacks; 4xx are the
client's), the p95 latency (answered by the arm, cache hits left out) and the shadow similarity, each with a CI.
Each arm's window starts when its current version first answered (or at `--since`): a challenger that moved starts
afresh.

Every other arm is compared with the control (`@champion`'s arm) on the feedback score by the sequential test in
`sequential.py`, at alpha / (number of comparisons), so the chance of any false winner stays at most alpha however
often the report is read. Each report is an MLflow run in `fibreflow-ab` with a plot per arm over time. With
`--promote`, a challenger that wins live is promoted through the registry's gate (`fibreflow promote`: it must
also pass the offline evaluation), recorded on both the report's run and the version.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from fibreflow.core.config import Strict, resolve_path
from fibreflow.core.errors import FibreFlowError
from fibreflow.monitor.config import Ab
from fibreflow.monitor.sequential import VAR_FLOOR, Decision, half_width, msprt

REQUESTS = """
SELECT coalesce(routed_arm, arm), arm, model_version, status, latency_ms, completion_tokens, cache, fallback, at
FROM request_audit
WHERE model = %(model)s AND at >= %(since)s AND NOT forced AND endpoint IN ('/v1/chat/completions', '/v1/completions')
  AND coalesce(routed_arm, arm) IS NOT NULL AND coalesce(routed_arm, arm) <> 'fallback'
ORDER BY at
"""
VOTES = """
SELECT f.arm, f.model_version, f.score, f.thumbs, f.at FROM feedback f
WHERE f.at >= %(since)s AND f.arm <> 'fallback' AND EXISTS (
    SELECT 1 FROM request_audit a WHERE a.response_id = f.response_id AND a.model = %(model)s
    AND (NOT a.forced OR a.endpoint = '/v1/arena/battles'))
ORDER BY f.at
"""


class AbError(FibreFlowError):
    """The A/B report cannot be made (no traffic, no such experiment, promotion refused before it started)."""


class Estimate(Strict):
    value: float | None
    low: float | None
    high: float | None
    n: int


class ArmReport(Strict):
    arm: str
    version: str
    since: dt.datetime
    requests: int
    votes: int
    mean_completion_tokens: float | None
    feedback_score: Estimate
    thumbs_up_rate: Estimate
    error_rate: Estimate
    p95_latency_ms: Estimate
    shadow_similarity: Estimate


class Comparison(Strict):
    arm: str
    control: str
    diff: float | None  # arm - control, feedback score
    low: float  # the always-valid CI at alpha
    high: float
    alpha: float  # this comparison's share of the stated rate
    decision: Decision
    winner: str | None


class AbReport(Strict):
    model: str
    since: dt.datetime
    control: str
    alpha: float
    min_effect: float
    arms: list[ArmReport]
    comparisons: list[Comparison]
    guarantee: str
    run_id: str | None = None
    link: str | None = None
    promotion: dict[str, Any] | None = None


# ---- estimates --------------------------------------------------------------------------------------------------


def _mean(x: list[float], confidence: float) -> Estimate:
    from scipy import stats

    if not x:
        return Estimate(value=None, low=None, high=None, n=0)
    a = np.asarray(x, dtype=float)
    if a.size < 2 or np.all(a == a[0]):
        return Estimate(value=float(a.mean()), low=None if a.size < 2 else float(a[0]),
                        high=None if a.size < 2 else float(a[0]), n=a.size)  # fmt: skip
    ci = stats.ttest_1samp(a, 0).confidence_interval(confidence)
    return Estimate(value=float(a.mean()), low=max(0.0, float(ci.low)), high=min(1.0, float(ci.high)), n=a.size)


def _rate(k: int, n: int, confidence: float) -> Estimate:
    from scipy import stats

    if n == 0:
        return Estimate(value=None, low=None, high=None, n=0)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Estimate(value=k / n, low=float(ci.low), high=float(ci.high), n=n)


def _p95(x: list[float], confidence: float) -> Estimate:
    """The 95th percentile with a distribution-free CI (order statistics); a bound too few points support: None."""
    from scipy import stats

    if not x:
        return Estimate(value=None, low=None, high=None, n=0)
    q = float(np.quantile(x, 0.95))
    ci = stats.quantile_test(np.asarray(x), q=q, p=0.95).confidence_interval(confidence)
    low, high = (None if np.isnan(b) else float(b) for b in (ci.low, ci.high))
    return Estimate(value=q, low=low, high=high, n=len(x))


# ---- the data ---------------------------------------------------------------------------------------------------


@dataclass
class Traffic:
    requests: list[tuple[Any, ...]]
    votes: list[tuple[Any, ...]]
    shadow: list[dict[str, Any]]


def load(model: str, since: dt.datetime, cfg: Ab) -> Traffic:
    from fibreflow.core.db import open_db

    with open_db() as conn:
        for table in ("request_audit", "feedback"):
            if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
                raise AbError(f"this database has no {table} table: `fibreflow db migrate`, then serve with audit on")
        if conn.execute("SELECT 1 FROM information_schema.columns WHERE table_name = 'request_audit' AND "
                        "column_name = 'routed_arm'").fetchone() is None:  # fmt: skip
            raise AbError("the audit log predates A/B reports (no routed_arm column): `fibreflow db migrate`")
        args = {"model": model, "since": since}
        requests = conn.execute(REQUESTS, args).fetchall()
        votes = conn.execute(VOTES, args).fetchall()
    shadow, path = [], resolve_path(cfg.shadow_log)
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed router
                continue
            if rec.get("model") == model and rec.get("ts", 0) >= since.timestamp():
                shadow.append(rec)
    return Traffic(requests, votes, shadow)


def arm_report(arm: str, t: Traffic, since: dt.datetime, confidence: float) -> ArmReport:
    """One arm over the window of its current version (the version of its latest own answer)."""
    own = [r for r in t.requests if r[0] == arm and r[1] == arm]
    copies = [s for s in t.shadow if s.get("arm") == arm]  # a shadow arm's: it answers no user
    version = own[-1][2] if own else copies[-1].get("version") if copies else next(
        (v[1] for v in reversed(t.votes) if v[0] == arm), "unknown")  # fmt: skip
    start = next((r[8] for r in own if r[2] == version), since)
    reqs = [r for r in t.requests if r[0] == arm and r[8] >= start and (r[1] != arm or r[2] == version)]
    served = [r for r in reqs if not 400 <= r[3] < 500]
    errors = sum(1 for r in served if r[3] >= 500 or r[7] is not None)
    answered = [r for r in reqs if r[1] == arm and r[3] == 200]
    votes = [v for v in t.votes if v[0] == arm and v[1] == version and v[4] >= start]
    thumbs = [v[3] for v in votes if v[3] is not None]
    shadow = [s["similarity"] for s in copies if str(s.get("version")) == str(version) and "similarity" in s]
    tokens = [r[5] for r in answered if r[5] is not None]
    return ArmReport(
        arm=arm, version=str(version), since=start, requests=len(reqs), votes=len(votes),
        mean_completion_tokens=float(np.mean(tokens)) if tokens else None,
        feedback_score=_mean([float(v[2]) for v in votes], confidence),
        thumbs_up_rate=_rate(thumbs.count("up"), len(thumbs), confidence),
        error_rate=_rate(errors, len(served), confidence),
        p95_latency_ms=_p95([float(r[4]) for r in answered if r[6] != "hit"], confidence),
        shadow_similarity=_mean(shadow, confidence),
    )  # fmt: skip


def scores_of(arm: ArmReport, t: Traffic) -> list[tuple[dt.datetime, float]]:
    return [(v[4], float(v[2])) for v in t.votes if v[0] == arm.arm and v[1] == arm.version and v[4] >= arm.since]


def report(model: str, since: dt.datetime, cfg: Ab, control: str | None = None) -> tuple[AbReport, Traffic]:
    t = load(model, since, cfg)
    names = sorted({r[0] for r in t.requests} | {v[0] for v in t.votes} | {s["arm"] for s in t.shadow if "arm" in s})
    if not names:
        raise AbError(f"no traffic for {model} since {since:%Y-%m-%d %H:%M %Z}: is it the experiment clients ask for, "
                      "and is the router's audit on?")  # fmt: skip
    control = control or cfg.control
    if control not in names:
        control = names[0]
    arms = [arm_report(a, t, since, cfg.confidence) for a in names]
    by_name = {a.arm: a for a in arms}
    others = [a.arm for a in arms if a.arm != control and a.requests]  # a shadow-only arm has no votes to compare
    alpha = cfg.alpha / max(1, len(others))  # Bonferroni: any false winner at most alpha in all
    comparisons = []
    for name in others:
        a = [s for _, s in scores_of(by_name[control], t)]
        b = [s for _, s in scores_of(by_name[name], t)]
        r = msprt(a, b, alpha=alpha, min_effect=cfg.min_effect, min_samples=cfg.min_samples)
        winner = {"a": control, "b": name}.get(r.winner or "")
        diff = None if np.isnan(r.diff) else r.diff
        comparisons.append(Comparison(arm=name, control=control, diff=diff, low=r.low, high=r.high, alpha=alpha,
                                      decision=r.decision, winner=winner))  # fmt: skip
    guarantee = (f"mSPRT (always-valid, read at any time): the chance of ever naming a winner when the arms do not "
                 f"differ is at most {cfg.alpha:.0%} in all ({alpha:.2%} per comparison); futility: the CI inside "
                 f"+-{cfg.min_effect} (a difference smaller than worth acting on); decisions after {cfg.min_samples} "
                 "votes per arm")  # fmt: skip
    out = AbReport(model=model, since=since, control=control, alpha=cfg.alpha, min_effect=cfg.min_effect, arms=arms,
                   comparisons=comparisons, guarantee=guarantee)  # fmt: skip
    return out, t


# ---- the record -------------------------------------------------------------------------------------------------


def plot(rep: AbReport, t: Traffic) -> Any:
    """Per arm, the running feedback score; per comparison, the difference with its always-valid CI over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    by_name = {a.arm: a for a in rep.arms}
    for arm in rep.arms:
        pts = scores_of(arm, t)
        if pts:
            times, scores = zip(*pts, strict=True)
            top.plot(times, np.cumsum(scores) / np.arange(1, len(scores) + 1), label=f"{arm.arm} (v{arm.version})")
    top.set_ylabel("feedback score (running mean)")
    top.set_ylim(-0.05, 1.05)
    top.legend(fontsize=8)
    for c in rep.comparisons:
        events = sorted([(at, 0, s) for at, s in scores_of(by_name[c.control], t)] +
                        [(at, 1, s) for at, s in scores_of(by_name[c.arm], t)])  # fmt: skip
        if not events:
            continue
        side = np.array([e[1] for e in events])
        x = np.array([e[2] for e in events], dtype=float)
        n = np.stack([np.cumsum(side == 0), np.cumsum(side == 1)])
        s = np.stack([np.cumsum(np.where(side == 0, x, 0)), np.cumsum(np.where(side == 1, x, 0))])
        ss = np.stack([np.cumsum(np.where(side == 0, x * x, 0)), np.cumsum(np.where(side == 1, x * x, 0))])
        ok = (n >= 2).all(axis=0)
        if not ok.any():
            continue
        n, s, ss = n[:, ok], s[:, ok], ss[:, ok]
        mean = s / n
        var = np.maximum((ss - s * mean) / (n - 1), VAR_FLOOR)  # as the test floors it
        d, h = mean[1] - mean[0], half_width((var / n).sum(axis=0), rep.min_effect, c.alpha)
        times = [e[0] for e, keep in zip(events, ok, strict=True) if keep]
        line = bottom.plot(times, d, label=f"{c.arm} - {c.control}")[0]
        bottom.fill_between(times, d - h, d + h, color=line.get_color(), alpha=0.2)
    bottom.axhline(0, color="black", linewidth=0.8)
    for edge in (-rep.min_effect, rep.min_effect):
        bottom.axhline(edge, color="grey", linestyle=":", linewidth=0.8)
    bottom.set_ylim(-1.05, 1.05)
    bottom.set_ylabel("difference (always-valid CI)")
    bottom.legend(fontsize=8)
    fig.suptitle(f"live A/B test of {rep.model}")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def log(rep: AbReport, t: Traffic, cfg: Ab, promote: bool) -> AbReport:
    """The report as an MLflow run in `cfg.experiment`; with `promote`, the promotion of a live winner nested in it."""
    import mlflow
    from fibreflow.core.tracking import run_link, setup_mlflow

    setup_mlflow(cfg.experiment)
    with mlflow.start_run(run_name=f"ab-{rep.model}") as run:
        params = {"model": rep.model, "since": rep.since.isoformat(), "control": rep.control, "alpha": rep.alpha,
                  "min_effect": rep.min_effect, "min_samples": cfg.min_samples}  # fmt: skip
        mlflow.log_params(params)
        metrics: dict[str, float] = {}
        for a in rep.arms:
            metrics |= {f"{a.arm}.requests": a.requests, f"{a.arm}.votes": a.votes}
            for name in ("feedback_score", "thumbs_up_rate", "error_rate", "p95_latency_ms", "shadow_similarity"):
                if (value := getattr(a, name).value) is not None:
                    metrics[f"{a.arm}.{name}"] = value
        for c in rep.comparisons:
            metrics |= {f"diff.{c.arm}.low": c.low, f"diff.{c.arm}.high": c.high}
            metrics |= {f"diff.{c.arm}": c.diff} if c.diff is not None else {}
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"model": rep.model} | {f"version.{a.arm}": a.version for a in rep.arms}
                        | {f"decision.{c.arm}": c.decision for c in rep.comparisons}
                        | {f"winner.{c.arm}": c.winner or "" for c in rep.comparisons})  # fmt: skip
        mlflow.log_figure(plot(rep, t), "ab/series.png")
        done = rep.model_copy(update={"run_id": run.info.run_id, "link": run_link(run)})
        if promote:
            done = done.model_copy(update={"promotion": promote_winner(done)})
            mlflow.set_tags({f"promotion.{k}": str(v)[:4000] for k, v in done.promotion.items()})  # type: ignore[union-attr]
        mlflow.log_dict(done.model_dump(mode="json"), "ab/report.json")
    return done


def promote_winner(rep: AbReport) -> dict[str, Any]:
    """A non-control arm that won live, promoted through the registry's gate if it is @challenger."""
    import mlflow
    from fibreflow.registry.registry import load_registry_config, promote

    won = [c for c in rep.comparisons if c.decision == "winner" and c.winner == c.arm]
    if not won:
        return {"promoted": False, "decision": "not attempted", "reasons": ["no arm beat the control live"]}
    c = max(won, key=lambda c: c.low)  # the surest winner
    version = next(a.version for a in rep.arms if a.arm == c.arm)
    try:
        result = promote(expected=version)
    except FibreFlowError as exc:
        return {"promoted": False, "decision": "refused", "arm": c.arm, "version": version, "reasons": [str(exc)]}
    mlflow.MlflowClient().set_model_version_tag(load_registry_config().name, version, "promotion.live_ab_run_id",
                                                rep.run_id or "")  # fmt: skip
    return {"arm": c.arm} | result


def main(model: str | None = None, since: dt.datetime | None = None, *, control: str | None = None,
         promote: bool = False, overrides: dict[str, Any] | None = None) -> AbReport:  # fmt: skip
    from fibreflow.monitor.config import load_monitoring_config
    from fibreflow.serving.config import load_serving_config

    cfg = load_monitoring_config(overrides).ab
    if model is None:
        experiments = load_serving_config().router.experiments
        if not experiments:
            raise AbError("serving.yaml has no experiment: name one with --experiment")
        model = experiments[0].model
    since = since or dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    rep, traffic = report(model, since, cfg, control)
    return log(rep, traffic, cfg, promote)


def render(rep: AbReport) -> str:
    def est(e: Estimate, fmt: str) -> str:
        if e.value is None:
            return "-"
        low = format(e.low, fmt) if e.low is not None else "?"
        high = format(e.high, fmt) if e.high is not None else "?"
        return f"{format(e.value, fmt)} [{low}, {high}]"

    widths = (12, 9, 17, 8, 6, 20, 20, 22, 20, 0)
    head = ("arm", "version", "since", "requests", "votes", "feedback score", "thumbs up", "error rate",
            "p95 latency ms", "shadow similarity")  # fmt: skip

    def row(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in (3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                         strict=True))).rstrip()  # fmt: skip

    lines = [f"Live A/B test of {rep.model} (control: {rep.control}); per-arm CIs at the configured confidence",
             row(head)]  # fmt: skip
    for a in rep.arms:
        lines.append(row((a.arm, a.version, f"{a.since:%Y-%m-%d %H:%M}", str(a.requests), str(a.votes),
                          est(a.feedback_score, ".2f"), est(a.thumbs_up_rate, ".2f"), est(a.error_rate, ".3f"),
                          est(a.p95_latency_ms, ".0f"), est(a.shadow_similarity, ".2f"))))  # fmt: skip
    for c in rep.comparisons:
        diff = f"{c.diff:+.3f}" if c.diff is not None else "n/a"
        verdict = f"winner: {c.winner}" if c.decision == "winner" else c.decision
        lines.append(f"{c.arm} vs {c.control}: feedback score {diff} [{c.low:+.3f}, {c.high:+.3f}] -> {verdict}")
    lines.append(rep.guarantee)
    if rep.promotion is not None:
        p = rep.promotion
        lines.append(f"promotion: {p.get('decision')} (v{p.get('version', '?')}): {'; '.join(p.get('reasons', []))}")
    if rep.link:
        lines.append(f"MLflow run {rep.run_id}: {rep.link}")
    return "\n".join(lines)
