"""Which arm answers a request: one pure decision over the request, the experiment and the upstreams' state.

In order: an unknown model is refused; a forced arm (QA's header; the caller checked the key may force) is
served as asked, or refused while its upstream's breaker is open, never silently replaced; the workload
schedule may send everything to the fallback; otherwise a strategy picks the arm (the schedule's pinned arm, or
the sticky weighted split), and the fallback answers instead while the router is overloaded or that arm's
breaker is open.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fibreflow.serving.config import Arm, Experiment, Period
from fibreflow.serving.protocol import ApiError


@dataclass(frozen=True)
class Target:
    """Where an arm's requests go: an upstream, the model name there, and the registry version (if any)."""

    upstream: str
    model: str
    version: str | None


@dataclass(frozen=True)
class Route:
    experiment: Experiment
    arm: str  # the arm's name, or "fallback"
    target: Target
    fallback: str | None = None  # why the fallback answers instead of the arm
    routed: str | None = None  # the arm the split chose when the fallback answers instead (breaker, overload)


@dataclass(frozen=True)
class Situation:
    """Everything the decision depends on besides the request."""

    experiments: dict[str, Experiment]
    targets: Callable[[str], dict[str, Target]]  # experiment model -> arm -> its target now (arms without one absent)
    ready: Callable[[Target], bool]  # may a request go to this target now (its breaker)?
    fallback: Target | None
    period: Period | None  # the workload schedule's current period
    overloaded: str | None  # why the router is overloaded now, if it is


class Strategy(Protocol):
    def pick(self, exp: Experiment, user: str, available: set[str]) -> Arm | None: ...


def unit_hash(salt: str, user: str) -> float:
    """A stable point in [0, 1) for this user in this experiment."""
    digest = hashlib.blake2b(f"{salt}\x00{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class StickyWeighted:
    """A hash of (experiment salt, user) falls into one arm's share of the weights: a user keeps their arm while
    the weights and salt stay; an arm without a target gives its share to the others, in proportion."""

    def pick(self, exp: Experiment, user: str, available: set[str]) -> Arm | None:
        arms = [a for a in exp.arms if a.name in available and a.name != exp.shadow and a.weight > 0]
        if not arms:
            return None
        point, acc = unit_hash(exp.salt, user) * sum(a.weight for a in arms), 0.0
        for arm in arms:
            acc += arm.weight
            if point < acc:
                return arm
        return arms[-1]


@dataclass(frozen=True)
class Pinned:
    """Everything to one arm (a schedule period's route), or the split when that arm has no target."""

    arm: str

    def pick(self, exp: Experiment, user: str, available: set[str]) -> Arm | None:
        found = next((a for a in exp.arms if a.name == self.arm), None)
        return found if found is not None and found.name in available else StickyWeighted().pick(exp, user, available)


def strategy(period: Period | None) -> Strategy:
    return (
        Pinned(period.route)
        if period is not None and period.route not in ("experiment", "fallback")
        else (StickyWeighted())
    )


def route(model: str, user: str, forced: str | None, now: Situation) -> Route:
    """The route for a request for `model` by `user`, or an ApiError (404 unknown model, 400 unknown forced arm,
    503 nothing can answer)."""
    exp = now.experiments.get(model)
    if exp is None:
        known = ", ".join(now.experiments)
        raise ApiError(
            404, f"The model `{model}` does not exist (served: {known})", param="model", code="model_not_found"
        )
    targets = now.targets(model)
    if forced is not None:
        target = targets.get(forced)
        if target is None:
            raise ApiError(
                400, f"arm {forced!r} of {model} is unknown or has no target (available: {', '.join(sorted(targets))})"
            )
        if not now.ready(target):
            raise ApiError(
                503, f"arm {forced} is unavailable: its upstream's circuit breaker is open", code="breaker_open"
            )
        return Route(exp, forced, target)
    period = now.period
    if period is not None and period.route == "fallback" and now.fallback is not None:
        return Route(exp, "fallback", now.fallback, f"schedule_{period.name}")
    arm = strategy(period).pick(exp, user, set(targets))
    if arm is None:
        if now.fallback is not None:
            return Route(exp, "fallback", now.fallback, "no_arm")
        raise ApiError(503, f"no arm of {model} has a model to serve (registry aliases unset?)")
    target = targets[arm.name]
    why = now.overloaded if now.fallback is not None else None
    if why is None and not now.ready(target):
        why = "breaker_open"
    if why is None:
        return Route(exp, arm.name, target)
    if now.fallback is None:
        raise ApiError(
            503, f"arm {arm.name} is unavailable: its upstream's circuit breaker is open", code="breaker_open"
        )
    return Route(exp, "fallback", now.fallback, why, routed=arm.name)
