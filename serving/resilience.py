"""When not to use an arm's upstream: circuit breakers, overload, and the workload schedule.

- A breaker per (upstream, model) opens after `breaker_failures` consecutive failures; while open, requests for
  it go straight to the fallback; after `breaker_reset_s` one trial request is let through (half-open). Only the
  upstream being unavailable counts as a failure (refused connection, timeout, 502/503/504); a 4xx, a 500, a
  request the client gave up on or one answered from the cache decide nothing, and a trial that ends that way
  frees the slot for the next one.
- Overload: more than `max_in_flight` requests in flight, or the recent upstream latency (EWMA) over
  `max_latency_s`, sends new requests to the fallback model.
- The schedule (business hours / after hours / weekends / month-end) picks a route per period.
"""

from __future__ import annotations

import calendar
import datetime as dt
import time
from zoneinfo import ZoneInfo

from fibreflow.serving.config import Period, Resilience, Schedule

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Attempt:
    """One call through a breaker; ends with `ok()`, `failed()` or neither (undecided: it counts for nothing)."""

    def __init__(self, breaker: Breaker, trial: bool) -> None:
        self.breaker, self.trial, self.outcome = breaker, trial, "undecided"

    def ok(self) -> None:
        self.outcome = "ok"

    def failed(self) -> None:
        self.outcome = "failed"

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.breaker._settle(self)


class Breaker:
    def __init__(self, failures: int, reset_s: float) -> None:
        self.failures_to_open, self.reset_s = failures, reset_s
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_out = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if time.monotonic() - self.opened_at >= self.reset_s else "open"

    def ready(self) -> bool:
        """Would a request be let through now (closed, or half-open with the trial slot free)?"""
        state = self.state
        return state == "closed" or (state == "half_open" and not self.trial_out)

    def attempt(self) -> Attempt | None:
        """Take a place for one call (None: open, or the half-open trial is taken). Use it as a context manager:
        the place is given back however the call ends."""
        state = self.state
        if state == "closed":
            return Attempt(self, trial=False)
        if state == "half_open" and not self.trial_out:
            self.trial_out = True  # half-open: exactly one trial at a time
            return Attempt(self, trial=True)
        return None

    def _settle(self, attempt: Attempt) -> None:
        if attempt.trial:
            self.trial_out = False
        if attempt.outcome == "ok":
            self.failures, self.opened_at = 0, None
        elif attempt.outcome == "failed":
            self.failures += 1
            if attempt.trial or self.failures >= self.failures_to_open:
                self.opened_at = time.monotonic()


class Guard:
    """Breakers, in-flight count and latency EWMA of one router."""

    def __init__(self, cfg: Resilience) -> None:
        self.cfg = cfg
        self.breakers: dict[tuple[str, str], Breaker] = {}
        self.in_flight = 0
        self.latency_ewma = 0.0

    def breaker(self, upstream: str, model: str) -> Breaker:
        key = (upstream, model)
        if key not in self.breakers:
            self.breakers[key] = Breaker(self.cfg.breaker_failures, self.cfg.breaker_reset_s)
        return self.breakers[key]

    def overloaded(self) -> str | None:
        """Why new requests should go to the fallback now (None: they need not)."""
        if self.in_flight > self.cfg.max_in_flight:
            return "overload_queue"
        if self.latency_ewma > self.cfg.max_latency_s:
            return "overload_latency"
        return None

    def observe(self, seconds: float) -> None:
        self.latency_ewma = seconds if self.latency_ewma == 0 else 0.9 * self.latency_ewma + 0.1 * seconds


def _matches(p: Period, now: dt.datetime) -> bool:
    if p.weekdays is not None and WEEKDAYS[now.weekday()] not in p.weekdays:
        return False
    if p.hours is not None and not (p.hours[0] <= now.hour < p.hours[1]):
        return False
    if p.last_days_of_month is not None:
        days = calendar.monthrange(now.year, now.month)[1]
        if now.day <= days - p.last_days_of_month:
            return False
    return True


def period(schedule: Schedule, now: dt.datetime | None = None) -> Period | None:
    """The first period that matches `now` (in the schedule's timezone), None when none does."""
    local = (now or dt.datetime.now(dt.UTC)).astimezone(ZoneInfo(schedule.timezone))
    return next((p for p in schedule.periods if _matches(p, local)), None)
