"""`fibreflow monitor`: a long-running process that runs `regress` on the schedule's cron expressions and soon
after every alias move (the registry's alias watcher), one run at a time (the regression lock also keeps it apart
from manual runs), until SIGTERM or SIGINT: the run under way finishes, then it stops. Its Prometheus gauges
say how each arm's last run ended, what it scored against the baseline, when it ran, and when the next one is due."""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

from fibreflow.core.errors import FibreFlowError, LockBusy
from fibreflow.monitor.config import MonitoringConfig, Schedule

log = logging.getLogger("fibreflow.monitor")
STATUS_VALUE = {"ok": 0, "regressed": 1, "unmeasured": 2}
Regress = Callable[[], list[Any]]  # one regression run over every arm


def next_cron(schedule: Schedule, after: dt.datetime) -> dt.datetime:
    """The earliest time after `after` that one of the cron expressions names, in the schedule's timezone."""
    from croniter import croniter

    local = after.astimezone(ZoneInfo(schedule.timezone))
    return min(croniter(expr, local).get_next(dt.datetime) for expr in schedule.cron).astimezone(dt.UTC)


class Monitor:
    """Runs `regress` when due; `stop()` (or SIGTERM) ends it after the run under way."""

    def __init__(self, cfg: MonitoringConfig, regress: Regress, registry: Any | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.cfg, self.regress = cfg, regress
        self._stop, self._wake = threading.Event(), threading.Event()
        self._due_after_move: dt.datetime | None = None
        self.registry = registry or CollectorRegistry()
        r, p = self.registry, "fibreflow_monitor_"
        self.last_status = Gauge(p + "last_status", "Last regression run per arm: 0 ok, 1 regressed, 2 unmeasured",
                                 ["arm"], registry=r)  # fmt: skip
        self.last_run = Gauge(p + "last_run_timestamp_seconds", "When the last regression run ended", registry=r)
        self.next_run = Gauge(p + "next_run_timestamp_seconds", "When the next regression run is due", registry=r)
        self.runs = Counter(p + "runs", "Regression runs by outcome (done, busy, failed)", ["outcome"], registry=r)
        for outcome in ("done", "busy", "failed"):  # at 0 from the start, so increase() sees the first failure
            self.runs.labels(outcome)
        by = ["arm", "metric"]
        self.score = Gauge(p + "score", "Last run's live score per arm and metric", by, registry=r)
        self.baseline = Gauge(p + "baseline_score", "The promoting evaluation's score, same rows", by, registry=r)
        self.diff_low = Gauge(p + "score_diff_ci_low", "Lower CI bound of live - baseline", by, registry=r)
        self.watcher: Any = None

    def on_alias(self, alias: str, old: str | None, new: str | None) -> None:
        """A promotion or rollback: measure what is served now, `after_alias_move_s` from now."""
        if old is not None or new is not None:
            self._due_after_move = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.cfg.schedule.after_alias_move_s)
            log.info("alias %s moved v%s -> v%s: a regression run is due at %s", alias, old, new, self._due_after_move)
            self._wake.set()

    def due(self, now: dt.datetime) -> dt.datetime:
        when = next_cron(self.cfg.schedule, now)
        return min(when, self._due_after_move) if self._due_after_move is not None else when

    def run_once(self) -> None:
        self._due_after_move = None
        try:
            results = self.regress()
        except LockBusy as exc:  # a manual run (or another monitor) holds it: this turn is skipped
            self.runs.labels("busy").inc()
            log.warning("regression run skipped: %s", exc)
            return
        except FibreFlowError as exc:  # said what and how to fix it: the next turn may find it fixed
            self.runs.labels("failed").inc()
            log.warning("regression run failed: %s", exc)
            return
        except Exception:  # a long-running process outlives one bad run; the traceback goes to the log
            self.runs.labels("failed").inc()
            log.exception("regression run failed")
            return
        self.runs.labels("done").inc()
        for r in results:
            self.last_status.labels(r.arm).set(STATUS_VALUE[r.status])
            for metric, value in r.scores.items():
                self.score.labels(r.arm, metric).set(value)
            for metric, value in r.baseline.items():
                self.baseline.labels(r.arm, metric).set(value)
            for v in r.verdicts:
                self.diff_low.labels(r.arm, v.metric).set(v.diff.low)
        self.last_run.set_to_current_time()

    def run(self) -> None:
        """Until stopped: sleep until the next run is due (or an alias moves), run it."""
        while not self._stop.is_set():
            now = dt.datetime.now(dt.UTC)
            when = self.due(now)
            self.next_run.set(when.timestamp())
            self._wake.clear()
            if self._wake.wait(max(0.0, (when - now).total_seconds())) or self._stop.is_set():
                continue  # woken: an alias moved (reschedule) or a stop
            self.run_once()

    def stop(self, *_: Any) -> None:
        self._stop.set()
        self._wake.set()


def main(overrides: dict[str, Any] | None = None) -> None:
    """`fibreflow monitor`: the gauges on `schedule.metrics_listen`, the alias watcher, the loop; SIGTERM stops it."""
    from fibreflow.core.tracking import setup_mlflow
    from fibreflow.monitor.config import load_monitoring_config
    from fibreflow.monitor.regress import main as regress
    from fibreflow.registry.registry import load_registry_config
    from fibreflow.registry.watch import AliasWatcher
    from prometheus_client import start_http_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_monitoring_config(overrides)
    setup_mlflow(cfg.experiment)
    monitor = Monitor(cfg, lambda: regress(overrides))
    signal.signal(signal.SIGTERM, monitor.stop)
    signal.signal(signal.SIGINT, monitor.stop)
    server = None
    if cfg.schedule.metrics_listen:
        host, _, port = cfg.schedule.metrics_listen.rpartition(":")
        server, _ = start_http_server(int(port), host or "127.0.0.1", registry=monitor.registry)
    watcher = AliasWatcher(load_registry_config().name, ("champion", "challenger"), monitor.on_alias,
                           cfg.schedule.alias_poll_s)  # fmt: skip
    watcher.poll()  # what is set now is not a move
    monitor._due_after_move = None
    watcher.start()
    log.info("monitoring: next regression run at %s", monitor.due(dt.datetime.now(dt.UTC)))
    try:
        monitor.run()
    finally:
        watcher.stop()
        if server is not None:
            server.shutdown()
