"""Monitoring config (`configs/monitoring.yaml`): the frozen suite, the live router, the decision policy, alerts."""

from __future__ import annotations

from typing import Any

from fibreflow.core.config import Strict, load_config
from pydantic import Field, PositiveInt, field_validator


class Suite(Strict):
    path: str
    sha256: str | None = None  # None: frozen on first use (then pin the printed hash here)


class RouterEndpoint(Strict):
    base_url: str
    model: str
    api_key_env: str | None = None
    arms: list[str] = Field(min_length=1)
    concurrency: PositiveInt = 8
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(1, ge=0)


class Rule(Strict):
    """Regressed when the paired CI of (live - baseline) lies wholly below -tolerance, `consecutive` runs in a row."""

    tolerance: float = Field(ge=0)
    consecutive: PositiveInt = 1


class Alert(Strict):
    webhook_url: str | None = None
    timeout_s: float = Field(10.0, gt=0)


class Schedule(Strict):
    """`fibreflow monitor`: when it runs `regress` on its own."""

    cron: list[str] = Field(default_factory=lambda: ["0 2 * * *"])  # croniter syntax (a 6th field: seconds)
    timezone: str = "UTC"
    after_alias_move_s: float = Field(300.0, ge=0)  # a promotion or rollback: measure it this soon after
    alias_poll_s: float = Field(5.0, gt=0)
    metrics_listen: str | None = "127.0.0.1:9465"  # "host:port" of its Prometheus gauges (None: none)

    @field_validator("cron")
    @classmethod
    def _valid(cls, exprs: list[str]) -> list[str]:
        from croniter import croniter

        bad = [e for e in exprs if not croniter.is_valid(e)]
        if bad:
            raise ValueError(f"not a cron expression: {', '.join(bad)}")
        return exprs


class Ab(Strict):
    """`fibreflow ab report`: the live A/B test from feedback, audit rows and shadow scores."""

    experiment: str = "fibreflow-ab"  # the MLflow experiment of the reports
    control: str = "champion"  # the arm every other arm is compared with (absent: the first arm by name)
    alpha: float = Field(0.05, gt=0, lt=0.5)  # the false-winner rate the sequential test controls, at any reading
    min_effect: float = Field(0.05, gt=0, le=1)  # the smallest feedback-score difference worth acting on
    min_samples: PositiveInt = 30  # votes per arm before any decision
    confidence: float = Field(0.95, gt=0, lt=1)  # of the per-arm CIs
    shadow_log: str = "var/serving/shadow.jsonl"  # where the router writes its shadow scores


class MonitoringConfig(Strict):
    suite: Suite
    router: RouterEndpoint
    experiment: str = "fibreflow-regression"
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap_resamples: PositiveInt = 10_000
    policy: dict[str, Rule]
    unmeasured_failed_share: float = Field(0.0, ge=0, le=1)
    rollback: list[str] = Field(default_factory=list)
    alert: Alert = Alert()
    schedule: Schedule = Schedule()
    ab: Ab = Ab()


def load_monitoring_config(overrides: dict[str, Any] | None = None) -> MonitoringConfig:
    return load_config(MonitoringConfig, "monitoring", overrides)
