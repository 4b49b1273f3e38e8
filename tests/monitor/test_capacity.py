"""`fibreflow capacity`: the cost model and the VRAM planner (pure, table-driven), the users-held rule, and the tool
itself driving the real model server and the router in front of it side by side, with an endpoint that is down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fibreflow.monitor.capacity import Sample, Step, load_capacity_config, summarise, users_held
from fibreflow.monitor.costs import (
    Api,
    Arch,
    Costs,
    Hardware,
    Phase,
    Plan,
    Served,
    Tokens,
    kv_bytes_per_token,
    kv_cache_tokens,
    phase_costs,
    plan_fits,
    weights_gib,
)

LLAMA3_70B = Arch(params_b=70.6, layers=80, kv_heads=8, head_dim=128, kv_bytes=2)


def test_kv_cache_and_weights_arithmetic() -> None:
    assert kv_bytes_per_token(LLAMA3_70B) == 2 * 80 * 8 * 128 * 2 == 327_680  # 320 KiB a token
    assert weights_gib(LLAMA3_70B, 4.0) == pytest.approx(70.6e9 / 2 / 2**30)  # 32.9 GiB at 4 bits
    assert kv_cache_tokens(LLAMA3_70B, 2 * 2**30) == 2 * 2**30 // 327_680 == 6553


def costs(**kw: Any) -> Costs:
    base = {"tokens_per_question": Tokens(input=1000, output=200), "working_days_per_month": 20,
            "electricity_usd_per_kwh": 0.2, "load_factor": 0.5, "hosting_usd_per_month": 50,
            "phases": [Phase(name="p", users=10, questions_per_user_per_day=10)],
            "apis": [Api(name="pricey", input=10.0, output=30.0),
                     Api(name="cheap", input=0.1, output=0.4)]}  # fmt: skip
    return Costs(**(base | kw))


def test_phase_costs_and_payback() -> None:
    box = Hardware(name="box", gpus=1, gib_per_gpu=48, price_usd=3650, amortisation_months=36, watts=1000)
    (c,) = phase_costs(costs(), [box])
    assert c.questions_per_month == 10 * 10 * 20 == 2000
    assert c.api_usd["pricey"] == pytest.approx(2000 * (1000 * 10 + 200 * 30) / 1e6)  # $32
    running = 1.0 * 730 * 0.5 * 0.2 + 50  # kW x hours x load factor x tariff + hosting = $123
    assert c.self_hosted_usd["box"] == pytest.approx(3650 / 36 + running)
    assert c.payback_months["box"]["pricey"] is None  # the API costs less than running the box: never pays back
    busy = costs(phases=[Phase(name="busy", users=50, questions_per_user_per_day=100)])
    (b,) = phase_costs(busy, [box])
    assert b.api_usd["pricey"] == pytest.approx(1600)
    assert b.payback_months["box"]["pricey"] == pytest.approx(3650 / (1600 - running))
    assert b.payback_months["box"]["cheap"] is None


def test_the_planner_says_what_fits() -> None:
    models = {"big": LLAMA3_70B, "small": Arch(params_b=7.25, layers=32, kv_heads=8, head_dim=128)}
    a6000 = Hardware(name="a6000", gpus=1, gib_per_gpu=48, price_usd=1, amortisation_months=1, watts=1)
    duo = Hardware(name="duo", gpus=2, gib_per_gpu=16, price_usd=1, amortisation_months=1, watts=1)
    alone = Plan(usable_fraction=0.92, overhead_gib=1.5, serve=[Served(model="big", bits=4.25, context=4096,
                                                                       concurrent=2)])  # fmt: skip
    fit_a6000, fit_duo = plan_fits(alone, models, [a6000, duo])
    # 34.9 GiB of weights + 2 x 4096 x 320 KiB = 2.5 GiB of cache + 1.5 GiB: 38.9 of 44.2 GiB
    assert fit_a6000.fits and fit_a6000.need_gib == pytest.approx(34.93 + 2.5 + 1.5, abs=0.01)
    assert fit_a6000.detail["big"]["max_concurrent"] == pytest.approx((44.16 - 34.93 - 1.5) / 1.25, abs=0.02)
    assert not fit_duo.fits  # 29.4 GiB usable: the weights alone do not fit
    both = alone.model_copy(update={"serve": [*alone.serve, Served(model="small", bits=4.25, context=4096,
                                                                   concurrent=2)]})  # fmt: skip
    (with_fallback,) = plan_fits(both, models, [a6000])
    assert not with_fallback.fits and with_fallback.need_gib > with_fallback.have_gib


def step(users: int, p95: float | None, errors: int = 0, requests: int = 10) -> Step:
    return Step("e", users, requests, errors, p95, p95, None, None, 1.0, 1.0)


@pytest.mark.parametrize(
    ("steps", "held"),
    [
        ([step(1, 0.5), step(2, 1.0), step(4, 1.9), step(8, 2.5)], 4),
        ([step(1, 2.5), step(2, 1.0)], 0),  # not even one user
        ([step(1, 0.5), step(2, 1.0, errors=1), step(4, 1.0)], 1),  # 10% errors at 2 users: stops there
        ([step(4, 1.0), step(1, 0.5), step(2, None, errors=10)], 1),  # order of steps does not matter
    ],
)
def test_users_held_is_the_last_step_of_an_unbroken_run_under_target(steps: list[Step], held: int) -> None:
    assert users_held(steps, 2.0, 0.01) == held


def test_a_step_summary() -> None:
    samples = [Sample(True, float(i), 0.1 * i, 10) for i in range(1, 21)] + [Sample(False, 0.5, None, 0, "503")]
    s = summarise("e", 4, samples, wall_s=10.0)
    assert (s.requests, s.errors, s.tokens_per_s, s.first_errors) == (21, 1, 20.0, ["503"])
    assert s.p50_s == pytest.approx(10.5) and s.p95_s == pytest.approx(19.05) and s.ttft_p95_s == pytest.approx(1.905)


def test_the_shipped_config_loads_and_names_its_models() -> None:
    cfg = load_capacity_config()
    assert {s.model for s in cfg.plan.serve} <= set(cfg.models) and cfg.load.target_p95_s == 2.0
    with pytest.raises(Exception, match="not under models"):
        load_capacity_config({"plan.serve": [{"model": "gpt-5", "bits": 4, "context": 1, "concurrent": 1}]})


@pytest.mark.integration
def test_capacity_drives_the_model_server_and_the_router_side_by_side(
    upstream: str, run_app: Any, store: str, project_tmp: Path
) -> None:
    import mlflow
    from fibreflow.cli.main import app
    from fibreflow.serving.config import ServingConfig
    from fibreflow.serving.router import create_app
    from servers import free_port
    from typer.testing import CliRunner

    arms = [{"name": "a", "upstream": "local", "model": "alpha", "weight": 1.0}]
    cfg = ServingConfig.model_validate({"router": {
        "upstreams": {"local": {"url": f"{upstream}/v1"}}, "experiments": [{"model": "assistant", "salt": "s",
                                                                             "arms": arms}],
        "auth": {"required": False}, "audit": {"enabled": False}, "cache": {"enabled": False}}})  # fmt: skip
    router = run_app(create_app(cfg, redis_url="", watch=False))
    args = ["capacity", "--endpoint", f"direct={upstream}/v1@alpha", "--endpoint", f"router={router}/v1@assistant",
            "--endpoint", f"down=http://127.0.0.1:{free_port()}/v1@x", "--concurrency", "1,2", "--duration", "1.5",
            "--json", "--set", "load.target_p95_s=60", "--set", "load.stop_above_p95_s=null"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{") :])
    steps = {(s["endpoint"], s["users"]): s for s in out["steps"]}
    for name in ("direct", "router"):
        for users in (1, 2):
            s = steps[(name, users)]
            assert s["requests"] >= users and s["errors"] == 0, s
            assert s["tokens_per_s"] > 0 and 0 < s["ttft_p95_s"] <= s["p95_s"]
    assert out["users_held"] == {"direct": 2, "router": 2, "down": 0}
    assert steps[("down", 1)]["errors"] == steps[("down", 1)]["requests"] > 0  # refused: counted, not a crash
    run = mlflow.get_run(out["run_id"])
    assert run.data.metrics["router.users_held"] == 2
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"], "capacity")}
    assert artifacts == {"capacity/report.json", "capacity/users.png"}
