"""The money and memory side of `fibreflow capacity` (configs/capacity.yaml), pure functions: what a phase of the
rollout costs self-hosted and through each API, when the hardware pays for itself, and whether the models, their
context and their concurrent sequences fit in a hardware option's GPU memory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fibreflow.core.config import Strict
from pydantic import Field, PositiveInt

GIB = 2**30
HOURS_PER_MONTH = 730  # 8,760 h / 12


class Phase(Strict):
    name: str
    users: PositiveInt
    questions_per_user_per_day: float = Field(gt=0)


class Api(Strict):
    name: str
    input: float = Field(ge=0)  # USD per million input tokens
    output: float = Field(ge=0)  # USD per million output tokens


class Tokens(Strict):
    input: PositiveInt
    output: PositiveInt


class Costs(Strict):
    tokens_per_question: Tokens
    working_days_per_month: float = Field(gt=0, le=31)
    electricity_usd_per_kwh: float = Field(ge=0)
    load_factor: float = Field(gt=0, le=1)
    hosting_usd_per_month: float = Field(ge=0)
    phases: list[Phase] = Field(min_length=1)
    apis: list[Api] = Field(min_length=1)


class Hardware(Strict):
    name: str
    gpus: PositiveInt
    gib_per_gpu: float = Field(gt=0)
    price_usd: float = Field(gt=0)
    amortisation_months: PositiveInt
    watts: float = Field(gt=0)  # the whole box at full load


class Arch(Strict):
    """What sizes a model in memory: parameters for its weights, the attention shape for its KV cache."""

    params_b: float = Field(gt=0)
    layers: PositiveInt
    kv_heads: PositiveInt
    head_dim: PositiveInt
    kv_bytes: PositiveInt = 2  # per cached value: 2 for fp16/bf16, 4 for fp32

    @classmethod
    def from_hf_config(cls, folder: Path, params: int, kv_bytes: int) -> Arch:
        """From a Hugging Face model folder's config.json (the vLLM cross-check reads the served model's)."""
        c = json.loads((folder / "config.json").read_text())
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        return cls(params_b=params / 1e9, layers=c["num_hidden_layers"], kv_heads=c.get("num_key_value_heads", heads),
                   head_dim=head_dim, kv_bytes=kv_bytes)  # fmt: skip


class Served(Strict):
    model: str
    bits: float = Field(gt=0, le=32)  # per weight, quantization scales included (4-bit AWQ/GPTQ ~4.25)
    context: PositiveInt
    concurrent: PositiveInt


class Plan(Strict):
    usable_fraction: float = Field(gt=0, le=1)
    overhead_gib: float = Field(ge=0)
    serve: list[Served] = Field(min_length=1)


# ---- money ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseCost:
    phase: str
    questions_per_month: float
    api_usd: dict[str, float]  # per API, a month
    self_hosted_usd: dict[str, float]  # per hardware option, a month (amortisation + power + hosting)
    payback_months: dict[str, dict[str, float | None]]  # hardware -> API -> months until it paid for itself


def kv_bytes_per_token(a: Arch) -> int:
    """K and V for every layer and KV head: 2 x layers x kv_heads x head_dim x bytes
    (Llama 3 70B: 2 x 80 x 8 x 128 x 2 = 327,680 bytes = 320 KiB a token)."""
    return 2 * a.layers * a.kv_heads * a.head_dim * a.kv_bytes


def running_usd(hw: Hardware, c: Costs) -> float:
    """What the box costs a month apart from its price: power at the load factor, hosting."""
    kwh = hw.watts / 1000 * HOURS_PER_MONTH * c.load_factor
    return kwh * c.electricity_usd_per_kwh + c.hosting_usd_per_month


def phase_costs(c: Costs, hardware: list[Hardware]) -> list[PhaseCost]:
    out = []
    for p in c.phases:
        questions = p.users * p.questions_per_user_per_day * c.working_days_per_month
        t = c.tokens_per_question
        api = {a.name: questions * (t.input * a.input + t.output * a.output) / 1e6 for a in c.apis}
        own = {h.name: h.price_usd / h.amortisation_months + running_usd(h, c) for h in hardware}
        payback = {
            h.name: {a: (h.price_usd / (usd - running_usd(h, c)) if usd > running_usd(h, c) else None)
                     for a, usd in api.items()}
            for h in hardware
        }  # fmt: skip
        out.append(PhaseCost(p.name, questions, api, own, payback))
    return out


# ---- memory --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    hardware: str
    need_gib: float  # weights + KV cache + overhead of everything in `plan.serve`
    have_gib: float  # usable GPU memory of the option
    fits: bool
    detail: dict[str, dict[str, float]]  # per model: weights_gib, kv_gib, max_concurrent (at its context)


def weights_gib(a: Arch, bits: float) -> float:
    return a.params_b * 1e9 * bits / 8 / GIB


def plan_fits(plan: Plan, models: dict[str, Arch], hardware: list[Hardware]) -> list[Fit]:
    """Every served model on every option at once (tensor parallel spreads weights and cache over the GPUs; the
    overhead is per model and GPU). `max_concurrent`: sequences of the model's full context that the memory left
    after everything else's weights and overheads, and the other models' caches, would hold."""
    fits = []
    for hw in hardware:
        have = hw.gpus * hw.gib_per_gpu * plan.usable_fraction
        parts = {}
        for s in plan.serve:
            a = models[s.model]
            w, kv = weights_gib(a, s.bits), kv_bytes_per_token(a) * s.context * s.concurrent / GIB
            parts[s.model] = {"weights_gib": w, "kv_gib": kv, "overhead_gib": plan.overhead_gib * hw.gpus}
        need = sum(sum(p.values()) for p in parts.values())
        detail = {}
        for s in plan.serve:
            rest = need - parts[s.model]["kv_gib"]
            per_seq = kv_bytes_per_token(models[s.model]) * s.context / GIB
            detail[s.model] = parts[s.model] | {"max_concurrent": max(0.0, (have - rest) / per_seq)}
        fits.append(Fit(hw.name, need, have, need <= have, detail))
    return fits


def kv_cache_tokens(a: Arch, cache_bytes: float) -> int:
    """Tokens a KV cache of `cache_bytes` holds (what vLLM reports as its blocks x block size)."""
    return int(cache_bytes // kv_bytes_per_token(a))
