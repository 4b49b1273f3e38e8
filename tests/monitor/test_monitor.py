"""`fibreflow monitor`: the cron schedule (croniter), the loop's bookkeeping, and the real process: an alias move
triggers a run, a run held off by the regression lock is skipped and counted, the gauges say so, SIGTERM stops it."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest
from fibreflow.core.errors import ConfigError, LockBusy
from fibreflow.eval.stats import PairedDiff
from fibreflow.monitor.config import Schedule, load_monitoring_config
from fibreflow.monitor.decide import MetricVerdict
from fibreflow.monitor.regress import Regression
from fibreflow.monitor.scheduler import Monitor, next_cron
from servers import free_port, until

UTC = dt.UTC


def test_the_next_run_is_the_earliest_expression_in_the_schedules_timezone() -> None:
    nightly = Schedule(cron=["0 2 * * *"], timezone="Africa/Johannesburg")  # 02:00 SAST = 00:00 UTC
    assert next_cron(nightly, dt.datetime(2026, 12, 2, 10, 0, tzinfo=UTC)) == dt.datetime(2026, 12, 3, 0, 0, tzinfo=UTC)
    both = Schedule(cron=["0 2 * * *", "30 13 * * 1-5"], timezone="Africa/Johannesburg")  # Wed 2 Dec 2026
    assert next_cron(both, dt.datetime(2026, 12, 2, 10, 0, tzinfo=UTC)) == dt.datetime(2026, 12, 2, 11, 30, tzinfo=UTC)
    assert next_cron(both, dt.datetime(2026, 12, 4, 12, 0, tzinfo=UTC)) == dt.datetime(2026, 12, 5, 0, 0, tzinfo=UTC)


def test_a_schedule_that_is_not_cron_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="not a cron expression: 61 2"):
        load_monitoring_config({"schedule.cron": ["0 2 * * *", "61 2 * * *"]})


def sample(monitor: Monitor, name: str, labels: dict[str, str] | None = None) -> float | None:
    return monitor.registry.get_sample_value(name, labels or {})


def test_the_loop_runs_when_due_counts_what_happened_and_stops_after_the_run_under_way() -> None:
    """A cron every second: a run that reports, one the lock held off, one that failed, then stop() mid-run."""
    cfg = load_monitoring_config({"schedule.cron": ["* * * * * *"], "schedule.timezone": "UTC"})
    calls: list[float] = []
    in_last_run, release = threading.Event(), threading.Event()

    def regress() -> list[Any]:
        calls.append(dt.datetime.now(UTC).timestamp())
        if len(calls) == 2:
            raise LockBusy("a regression run is already under way")
        if len(calls) == 3:
            raise RuntimeError("the tracking store went away")
        if len(calls) == 4:
            in_last_run.set()
            release.wait(10)  # stop() arrives while this run is under way: it finishes first
        worse = PairedDiff(a=0.75, b=0.5, diff=-0.25, low=-0.4, high=-0.1, n=16)
        verdict = MetricVerdict("accuracy", worse, below=True, streak=1, regressed=True, reason="accuracy fell")
        return [
            Regression("champion", "1", "ok", [], scores={"accuracy": 0.75}, baseline={"accuracy": 0.75}),
            Regression("challenger", "2", "regressed", ["accuracy fell"], [verdict], {"accuracy": 0.5},
                       {"accuracy": 0.75}),
        ]  # fmt: skip

    monitor = Monitor(cfg, regress)
    loop = threading.Thread(target=monitor.run)
    loop.start()
    assert in_last_run.wait(15)
    monitor.stop()
    release.set()
    loop.join(10)
    assert not loop.is_alive() and len(calls) == 4
    assert sample(monitor, "fibreflow_monitor_runs_total", {"outcome": "done"}) == 2
    assert sample(monitor, "fibreflow_monitor_runs_total", {"outcome": "busy"}) == 1
    assert sample(monitor, "fibreflow_monitor_runs_total", {"outcome": "failed"}) == 1
    assert sample(monitor, "fibreflow_monitor_last_status", {"arm": "champion"}) == 0
    assert sample(monitor, "fibreflow_monitor_last_status", {"arm": "challenger"}) == 1
    assert calls[-1] <= (sample(monitor, "fibreflow_monitor_last_run_timestamp_seconds") or 0)
    challenger = {"arm": "challenger", "metric": "accuracy"}
    assert sample(monitor, "fibreflow_monitor_score", challenger) == 0.5
    assert sample(monitor, "fibreflow_monitor_baseline_score", challenger) == 0.75
    assert sample(monitor, "fibreflow_monitor_score_diff_ci_low", challenger) == -0.4
    assert sample(monitor, "fibreflow_monitor_score", {"arm": "champion", "metric": "accuracy"}) == 0.75


def test_an_alias_move_brings_the_next_run_forward() -> None:
    cfg = load_monitoring_config({"schedule.cron": ["0 0 1 1 *"], "schedule.after_alias_move_s": 60})
    monitor = Monitor(cfg, lambda: [])
    now = dt.datetime.now(UTC)
    assert monitor.due(now) - now > dt.timedelta(seconds=61) or (now.month, now.day) == (12, 31)
    monitor.on_alias("champion", "3", "4")
    assert dt.timedelta(0) < monitor.due(now) - now <= dt.timedelta(seconds=61)


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


@pytest.mark.integration
def test_the_monitor_process_runs_after_alias_moves_skips_while_locked_and_stops_on_sigterm(
    gated_home: Path, pg_url: str, tmp_path: Path
) -> None:
    """No cron run is due (1 January); the router is unreachable, so every run is unmeasured (and recorded)."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import httpx
    import mlflow
    import psycopg

    suite = tmp_path / "suite.jsonl"
    suite.write_text(json.dumps({"id": "1", "question": "What is a PON?", "reference": "x", "kind": "exact"}) + "\n")
    port = free_port()
    sets = {"schedule.cron": '["0 0 1 1 *"]', "schedule.timezone": "UTC", "schedule.after_alias_move_s": 0,
            "schedule.alias_poll_s": 0.2, "schedule.metrics_listen": f"127.0.0.1:{port}", "suite.path": str(suite),
            "router.base_url": "http://127.0.0.1:9/v1", "router.retries": 0}  # fmt: skip
    args = [str(Path(sys.executable).with_name("fibreflow")), "monitor"]
    args += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    log = (tmp_path / "monitor.log").open("w")
    proc = subprocess.Popen(args, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    runs = ("fibreflow_monitor_runs_total", (("outcome", "done"),))
    busy = ("fibreflow_monitor_runs_total", (("outcome", "busy"),))

    def scrape() -> dict:
        assert proc.poll() is None, (tmp_path / "monitor.log").read_text()
        try:
            return metrics(port)
        except httpx.HTTPError:
            return {}

    try:
        until(lambda: ("fibreflow_monitor_next_run_timestamp_seconds", ()) in scrape(), 60, "the gauges answering")
        first = scrape()
        new_year = dt.datetime(dt.datetime.now(UTC).year + 1, 1, 1, tzinfo=UTC)
        assert first[("fibreflow_monitor_next_run_timestamp_seconds", ())] == new_year.timestamp()
        assert first.get(runs, 0) == 0  # nothing due, nothing run

        client = mlflow.MlflowClient()
        client.create_registered_model("fibreflow-assistant")
        version = client.create_model_version("fibreflow-assistant", str(tmp_path), run_id=None).version
        client.set_registered_model_alias("fibreflow-assistant", "champion", version)  # a promotion
        until(lambda: scrape().get(runs, 0) == 1, 60, "a regression run after the alias moved")
        after = scrape()
        assert after[("fibreflow_monitor_last_status", (("arm", "champion"),))] == 2  # unmeasured: no evaluation
        assert after[("fibreflow_monitor_last_status", (("arm", "challenger"),))] == 2  # unmeasured: unset
        recorded = mlflow.search_runs(experiment_names=["fibreflow-regression"], output_format="list")
        assert sorted(r.data.tags["status"] for r in recorded) == ["unmeasured", "unmeasured"]

        with psycopg.connect(pg_url, autocommit=True) as manual:  # a manual `fibreflow regress` under way
            manual.execute("SELECT pg_advisory_lock(hashtext('fibreflow-regress'))")
            client.set_registered_model_alias("fibreflow-assistant", "challenger", version)
            until(lambda: scrape().get(busy, 0) == 1, 60, "the run the lock held off, counted")
        assert scrape().get(runs) == 1 and "already under way" in (tmp_path / "monitor.log").read_text()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
