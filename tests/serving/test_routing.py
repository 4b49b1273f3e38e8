"""The routing decision, a pure function: table-driven over forced arms, the schedule, the split, breakers and
overload; and the sticky weighted split's proportions."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from fibreflow.serving.config import Experiment, Period
from fibreflow.serving.protocol import ApiError
from fibreflow.serving.routing import Pinned, Situation, StickyWeighted, Target, route, unit_hash

EXP = Experiment.model_validate(
    {
        "model": "assistant",
        "salt": "s",
        "shadow": "c",
        "arms": [
            {"name": "a", "upstream": "up", "alias": "champion", "weight": 0.9},
            {"name": "b", "upstream": "up", "alias": "challenger", "weight": 0.1},
            {"name": "c", "upstream": "up", "model": "shadowed", "weight": 0.0},
        ],
    }
)
A, B, C = Target("up", "m-v1", "1"), Target("up", "m-v2", "2"), Target("up", "shadowed", None)
FALLBACK = Target("up", "base", None)
BUSINESS = Period(name="business_hours", route="experiment")
PINNED_A = Period(name="weekends", route="a")
MONTH_END = Period(name="month_end", route="fallback")


def now(**kw: object) -> Situation:
    """A router with arms a, b (alias arms, both set) and c (shadow); breakers closed, not overloaded."""
    base = Situation(
        experiments={"assistant": EXP},
        targets=lambda model: {"a": A, "b": B, "c": C} if model == "assistant" else {},
        ready=lambda t: True,
        fallback=FALLBACK,
        period=None,
        overloaded=None,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def user_on(arm: str) -> str:
    """A user the sticky split puts on `arm` (with a and b available)."""
    return next(u for u in (f"user{i}" for i in range(1000)) if StickyWeighted().pick(EXP, u, {"a", "b"}).name == arm)  # type: ignore[union-attr]


A_USER, B_USER = user_on("a"), user_on("b")
OPEN_A = {"ready": lambda t: t != A}
ONLY_A = {"targets": lambda model: {"a": A}}
NOTHING = {"targets": lambda model: {}}


@pytest.mark.parametrize(
    ("user", "forced", "situation", "want"),
    [
        # the sticky split
        (A_USER, None, {}, ("a", None)),
        (B_USER, None, {}, ("b", None)),
        (B_USER, None, {"period": BUSINESS}, ("b", None)),
        # an arm without a target gives its users to the others
        (B_USER, None, ONLY_A, ("a", None)),
        # the schedule pins an arm, or sends everything to the fallback
        (B_USER, None, {"period": PINNED_A}, ("a", None)),
        (A_USER, None, {"period": MONTH_END}, ("fallback", "schedule_month_end")),
        # breakers and overload send the arm's users to the fallback, the others' stay
        (A_USER, None, OPEN_A, ("fallback", "breaker_open")),
        (B_USER, None, OPEN_A, ("b", None)),
        (A_USER, None, {"overloaded": "overload_queue"}, ("fallback", "overload_queue")),
        # nothing to serve: the fallback
        (A_USER, None, NOTHING, ("fallback", "no_arm")),
        # a forced arm is served as asked: past the split, the schedule, overload, weights and the shadow
        (A_USER, "b", {}, ("b", None)),
        (A_USER, "c", {}, ("c", None)),
        (A_USER, "b", {"period": MONTH_END, "overloaded": "overload_latency"}, ("b", None)),
    ],
)
def test_route_table(user: str, forced: str | None, situation: dict, want: tuple[str, str | None]) -> None:
    r = route("assistant", user, forced, now(**situation))
    assert (r.arm, r.fallback) == want
    assert r.target == {"a": A, "b": B, "c": C, "fallback": FALLBACK}[r.arm]


@pytest.mark.parametrize(
    ("model", "forced", "situation", "status", "message"),
    [
        ("nope", None, {}, 404, "`nope` does not exist (served: assistant)"),
        ("assistant", "zz", {}, 400, "arm 'zz' of assistant is unknown or has no target"),
        (
            "assistant",
            "a",
            OPEN_A,
            503,
            "arm a is unavailable: its upstream's circuit breaker is open",
        ),  # never the fallback
        ("assistant", None, NOTHING | {"fallback": None}, 503, "no arm of assistant has a model to serve"),
        ("assistant", None, OPEN_A | {"fallback": None}, 503, "circuit breaker is open"),
    ],
)
def test_route_refusals(model: str, forced: str | None, situation: dict, status: int, message: str) -> None:
    with pytest.raises(ApiError) as err:
        route(model, A_USER, forced, now(**situation))
    assert err.value.status == status and message in err.value.message


def test_overload_without_a_fallback_still_serves_the_arm() -> None:
    assert route("assistant", A_USER, None, now(overloaded="overload_queue", fallback=None)).arm == "a"


def test_split_proportions_and_stickiness() -> None:
    exp = Experiment.model_validate(
        {
            "model": "m",
            "salt": "s",
            "arms": [
                {"name": "a", "upstream": "u", "model": "x", "weight": 0.7},
                {"name": "b", "upstream": "u", "model": "y", "weight": 0.2},
                {"name": "c", "upstream": "u", "model": "z", "weight": 0.1},
            ],
        }
    )
    split, users = StickyWeighted(), [f"user-{i}" for i in range(10_000)]
    counts = Counter(split.pick(exp, u, {"a", "b", "c"}).name for u in users)  # type: ignore[union-attr]
    for arm, share in {"a": 0.7, "b": 0.2, "c": 0.1}.items():
        assert abs(counts[arm] / len(users) - share) < 0.015, counts
    assert all(split.pick(exp, u, {"a", "b", "c"}) == split.pick(exp, u, {"a", "b", "c"}) for u in users[:500])
    # an arm without a target gives its share to the others; users of the others keep their arm
    without_c = Counter(split.pick(exp, u, {"a", "b"}).name for u in users)  # type: ignore[union-attr]
    assert abs(without_c["a"] / len(users) - 0.7 / 0.9) < 0.015
    # another salt reshuffles
    assert sum(unit_hash("s", u) < 0.5 for u in users[:1000]) != sum(unit_hash("t", u) < 0.5 for u in users[:1000])
    # a pinned arm without a target falls back to the split
    assert Pinned("c").pick(exp, "user-1", {"a", "b"}) == split.pick(exp, "user-1", {"a", "b"})
