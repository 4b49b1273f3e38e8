"""`fibreflow capacity`: drive OpenAI-compatible endpoints (the router, vLLM, the model server) with FibreFlow's
question mix at rising concurrency and report, per endpoint and step, tokens/s, time to first token, p50/p95 of the
whole answer and the most concurrent users held at p95 < target; then the cost of the seed's phases against API
prices and which hardware fits the models (monitor/costs.py). One MLflow run with a plot of users vs p95 and
tokens/s; several endpoints side by side (before and after a change, in one run)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fibreflow.core.config import Strict, load_config
from fibreflow.monitor.costs import Arch, Costs, Fit, Hardware, PhaseCost, Plan, phase_costs, plan_fits
from pydantic import Field, PositiveInt, model_validator


class Endpoint(Strict):
    name: str
    base_url: str  # .../v1
    model: str
    api_key_env: str | None = None


class Load(Strict):
    concurrency: list[PositiveInt] = Field(min_length=1)
    duration_s: float = Field(gt=0)
    target_p95_s: float = Field(gt=0)
    max_error_rate: float = Field(0.01, ge=0, le=1)
    stop_above_p95_s: float | None = Field(None, gt=0)
    timeout_s: float = Field(180, gt=0)
    seed: int = 0


class MixPart(Strict):
    name: str
    share: float = Field(gt=0)
    max_tokens: PositiveInt
    questions: list[str] = Field(min_length=1)


class CapacityConfig(Strict):
    experiment: str
    endpoints: list[Endpoint] = Field(min_length=1)
    load: Load
    mix: list[MixPart] = Field(min_length=1)
    costs: Costs
    hardware: list[Hardware] = Field(min_length=1)
    plan: Plan
    models: dict[str, Arch]

    @model_validator(mode="after")
    def _known(self) -> CapacityConfig:
        for s in self.plan.serve:
            if s.model not in self.models:
                raise ValueError(f"plan.serve: model {s.model!r} is not under models")
        if len({e.name for e in self.endpoints}) != len(self.endpoints):
            raise ValueError("endpoints: names must be unique")
        return self


def load_capacity_config(overrides: dict[str, Any] | None = None) -> CapacityConfig:
    return load_config(CapacityConfig, "capacity", overrides)


@dataclass
class Sample:
    ok: bool
    latency_s: float
    ttft_s: float | None
    completion_tokens: int
    error: str | None = None


@dataclass
class Step:
    endpoint: str
    users: int
    requests: int
    errors: int
    p50_s: float | None
    p95_s: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tokens_per_s: float
    wall_s: float
    first_errors: list[str] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 1.0


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def summarise(endpoint: str, users: int, samples: list[Sample], wall_s: float) -> Step:
    ok = [s for s in samples if s.ok]
    lat, ttft = [s.latency_s for s in ok], [s.ttft_s for s in ok if s.ttft_s is not None]
    return Step(endpoint, users, len(samples), len(samples) - len(ok), percentile(lat, 50), percentile(lat, 95),
                percentile(ttft, 50), percentile(ttft, 95), sum(s.completion_tokens for s in ok) / wall_s, wall_s,
                [s.error for s in samples if s.error][:3])  # fmt: skip


def users_held(steps: list[Step], target_p95_s: float, max_error_rate: float) -> int:
    """The most users of a run of steps, from the fewest up, each of which kept p95 < target within the error
    budget (0: not even one user)."""
    held = 0
    for s in sorted(steps, key=lambda s: s.users):
        if s.p95_s is None or s.p95_s >= target_p95_s or s.error_rate > max_error_rate:
            break
        held = s.users
    return held


def questions(mix: list[MixPart], seed: int, user: int) -> Any:
    """User `user`'s endless question sequence: a part by share, then a question of it (the same for every
    endpoint, so they answer the same work)."""
    rng = random.Random(f"{seed}:{user}")
    weights = [m.share for m in mix]
    while True:
        part = rng.choices(mix, weights)[0]
        yield part.questions[rng.randrange(len(part.questions))], part.max_tokens


async def ask(client: Any, ep: Endpoint, question: str, max_tokens: int, timeout_s: float) -> Sample:
    """One streamed chat completion: time to the first content token and to the end, completion tokens from the
    usage chunk."""
    body = {"model": ep.model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, tokens = time.perf_counter(), None, 0
    try:
        async with client.stream("POST", f"{ep.base_url.rstrip('/')}/chat/completions", json=body,
                                 timeout=timeout_s) as resp:  # fmt: skip
            if resp.status_code != 200:
                return Sample(False, time.perf_counter() - start, None, 0, f"{resp.status_code}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = int(chunk["usage"].get("completion_tokens") or 0)
    except Exception as exc:  # a refused connection, a timeout, a broken stream: a failed request of this step
        return Sample(False, time.perf_counter() - start, None, 0, type(exc).__name__)
    return Sample(True, time.perf_counter() - start, first, tokens)


async def run_step(ep: Endpoint, users: int, cfg: CapacityConfig) -> Step:
    """`users` closed-loop users for `load.duration_s`: each asks its next question as soon as it has an answer;
    questions in flight at the end finish and count."""
    import httpx

    key = os.environ.get(ep.api_key_env, "") if ep.api_key_env else ""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=users, max_keepalive_connections=users)
    samples: list[Sample] = []
    start = time.perf_counter()
    deadline = start + cfg.load.duration_s
    async with httpx.AsyncClient(headers=headers, limits=limits) as client:

        async def user(i: int) -> None:
            for question, max_tokens in questions(cfg.mix, cfg.load.seed, i):
                if time.perf_counter() >= deadline:
                    return
                samples.append(await ask(client, ep, question, max_tokens, cfg.load.timeout_s))

        await asyncio.gather(*(user(i) for i in range(users)))
    return summarise(ep.name, users, samples, time.perf_counter() - start)


@dataclass
class Report:
    steps: list[Step]
    held: dict[str, int]  # endpoint -> users held at p95 < target
    target_p95_s: float
    costs: list[PhaseCost]
    fits: list[Fit]
    run_id: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"target_p95_s": self.target_p95_s, "users_held": self.held,
                "steps": [asdict(s) | {"error_rate": s.error_rate} for s in self.steps],
                "costs": [asdict(c) for c in self.costs], "fits": [asdict(f) for f in self.fits],
                "run_id": self.run_id}  # fmt: skip


def measure(cfg: CapacityConfig, progress: bool = True) -> list[Step]:
    from tqdm import tqdm

    steps = []
    total = len(cfg.endpoints) * len(cfg.load.concurrency)
    with tqdm(total=total, desc="capacity", unit="step", disable=not progress) as bar:
        for ep in cfg.endpoints:
            for users in sorted(cfg.load.concurrency):
                step = asyncio.run(run_step(ep, users, cfg))
                steps.append(step)
                bar.set_postfix_str(f"{ep.name} {users} users p95 {step.p95_s or float('nan'):.2f} s")
                bar.update()
                over = cfg.load.stop_above_p95_s
                if over is not None and (step.p95_s is None or step.p95_s > over):
                    bar.update(sum(u > users for u in cfg.load.concurrency))
                    break
    return steps


def plot(report: Report) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in report.held:
        mine = sorted((s for s in report.steps if s.endpoint == name), key=lambda s: s.users)
        users = [s.users for s in mine]
        left.plot(users, [s.p95_s for s in mine], marker="o", label=f"{name} (holds {report.held[name]})")
        right.plot(users, [s.tokens_per_s for s in mine], marker="o", label=name)
    left.axhline(report.target_p95_s, color="red", linestyle="--", label=f"target {report.target_p95_s:g} s")
    left.set(xlabel="concurrent users", ylabel="p95 of the whole answer (s)", xscale="log", ylim=(0, None))
    right.set(xlabel="concurrent users", ylabel="completion tokens/s", xscale="log", ylim=(0, None))
    ticks = sorted({s.users for s in report.steps})
    for ax in (left, right):
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main(overrides: dict[str, Any] | None = None, *, plan_only: bool = False, progress: bool = True) -> Report:
    """Measure (unless `plan_only`), price and plan; one MLflow run in `experiment` with the figures and the plot."""
    import mlflow
    from fibreflow.core.tracking import setup_mlflow

    cfg = load_capacity_config(overrides)
    steps = [] if plan_only else measure(cfg, progress)
    held = {ep.name: users_held([s for s in steps if s.endpoint == ep.name], cfg.load.target_p95_s,
                                cfg.load.max_error_rate) for ep in cfg.endpoints} if steps else {}  # fmt: skip
    report = Report(steps, held, cfg.load.target_p95_s, phase_costs(cfg.costs, cfg.hardware),
                    plan_fits(cfg.plan, cfg.models, cfg.hardware))  # fmt: skip
    setup_mlflow(cfg.experiment)
    with mlflow.start_run(run_name="capacity", nested=mlflow.active_run() is not None) as run:
        report.run_id = run.info.run_id
        mlflow.log_params({"endpoints": ",".join(f"{e.name}={e.base_url}" for e in cfg.endpoints),
                           "concurrency": ",".join(map(str, cfg.load.concurrency)),
                           "duration_s": cfg.load.duration_s, "target_p95_s": cfg.load.target_p95_s})  # fmt: skip
        for s in steps:
            for metric in ("p50_s", "p95_s", "ttft_p50_s", "ttft_p95_s", "tokens_per_s", "error_rate"):
                value = getattr(s, metric)
                if value is not None:
                    mlflow.log_metric(f"{s.endpoint}.{metric}", value, step=s.users)
        for name, users in held.items():
            mlflow.log_metric(f"{name}.users_held", users)
        for f in report.fits:
            mlflow.log_metric(f"fits.{f.hardware.replace(' ', '_')}", float(f.fits))
        mlflow.log_dict(report.summary(), "capacity/report.json")
        if steps:
            mlflow.log_figure(plot(report), "capacity/users.png")
    return report


def render(report: Report) -> str:
    """The report as text: steps per endpoint, users held, monthly costs and payback, what fits."""

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = []
    if report.steps:
        lines += ["endpoint | users | requests | errors | tokens/s | p50 s | p95 s | TTFT p50 s | TTFT p95 s", ""]
        lines += [f"{x.endpoint} | {x.users} | {x.requests} | {x.errors} | {x.tokens_per_s:.1f} | {s(x.p50_s)} | "
                  f"{s(x.p95_s)} | {s(x.ttft_p50_s)} | {s(x.ttft_p95_s)}" for x in report.steps]  # fmt: skip
        lines += [""] + [f"{name}: holds {n} concurrent users at p95 < {report.target_p95_s:g} s"
                         for name, n in report.held.items()]  # fmt: skip
    lines += ["", "monthly cost (USD) | questions | " + " | ".join(report.costs[0].api_usd)
              + " | " + " | ".join(report.costs[0].self_hosted_usd)]  # fmt: skip
    for c in report.costs:
        cells = [f"{v:,.0f}" for v in (*c.api_usd.values(), *c.self_hosted_usd.values())]
        lines.append(f"{c.phase} | {c.questions_per_month:,.0f} | " + " | ".join(cells))
    for c in report.costs:
        for hw, by_api in c.payback_months.items():
            paid = ", ".join(f"{api} {'never' if m is None else f'{m:.1f} months'}" for api, m in by_api.items())
            lines.append(f"payback of {hw} at {c.phase}: {paid}")
    lines.append("")
    for f in report.fits:
        models = "; ".join(
            f"{m} weights {d['weights_gib']:.1f} GiB + KV {d['kv_gib']:.1f} GiB "
            f"(holds {d['max_concurrent']:.1f} full-context sequences)"
            for m, d in f.detail.items()
        )
        verdict = "fits" if f.fits else "does NOT fit"
        lines.append(f"{f.hardware}: {verdict} ({f.need_gib:.1f} of {f.have_gib:.1f} GiB usable): {models}")
    if report.run_id:
        lines.append(f"\nMLflow run {report.run_id}")
    return "\n".join(lines)
