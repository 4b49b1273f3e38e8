"""Monitoring config (`configs/monitoring.yaml`): the frozen suite, the live router, the decision policy, alerts."""

from __future__ import annotations

from typing import Any

from fibreflow.core.config import Strict, load_config
from pydantic import Field, PositiveInt


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


def load_monitoring_config(overrides: dict[str, Any] | None = None) -> MonitoringConfig:
    return load_config(MonitoringConfig, "monitoring", overrides)
