"""Serving config (`configs/serving.yaml`): the local model server and the router."""

from __future__ import annotations

from typing import Any, Literal

from fibreflow.core.config import Strict, load_config
from pydantic import Field, PositiveInt, model_validator

TEMPLATES_DIR = "var/serving/templates"  # chat templates vLLM renders with, named by their hash (serving/vllm.py)
MERGED_DIR = "var/serving/merged"  # <served name>-<hash of its base and adapter>-<dtype>: merged once, reused after


class ModelServer(Strict):
    host: str = "127.0.0.1"
    port: int = 8001
    model: str = "smollm2-135m-instruct"  # catalogue name or model folder; adapters from the registry must match it
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 where native, else float32
    max_batch: PositiveInt = 16
    batch_wait_ms: float = Field(5.0, ge=0)
    registry_aliases: list[str] = Field(default_factory=lambda: ["champion", "challenger"])
    api_key_env: str | None = "FIBREFLOW_UPSTREAM_KEY"  # the variable holding the shared upstream token
    embeddings: str | None = "bundled"  # /v1/embeddings with this model (as embed.yaml `model`); null: none
    merged_aliases: list[str] = Field(default_factory=lambda: ["champion"])  # served merged (~2x the 4-bit path)


class Upstream(Strict):
    """An OpenAI-compatible server (this project's model server, vLLM): base URL ending in /v1."""

    url: str
    timeout_s: float = Field(120.0, gt=0)  # a whole non-streamed answer
    stream_read_timeout_s: float = Field(30.0, gt=0)  # the longest wait for a stream's next chunk
    connect_timeout_s: float = Field(3.0, gt=0)
    max_connections: PositiveInt = 100
    api_key_env: str | None = None  # the variable holding the upstream's shared token (vLLM's --api-key)


class Arm(Strict):
    """One side of an experiment: a registry alias (`alias: champion`), a version (`version: 3`) or a model the
    upstream already serves under a fixed name (`model: smollm2-135m-instruct`), with its traffic weight."""

    name: str
    upstream: str
    weight: float = Field(ge=0)
    alias: str | None = None
    version: int | None = None
    model: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> Arm:
        if sum(x is not None for x in (self.alias, self.version, self.model)) != 1:
            raise ValueError(f"arm {self.name}: give exactly one of alias / version / model")
        return self


class Experiment(Strict):
    """What clients asking for `model` get: a sticky weighted split over arms, optionally a shadow arm."""

    model: str
    salt: str
    arms: list[Arm] = Field(min_length=1)
    shadow: str | None = None  # an arm name: it gets a copy of each request; its answer is logged, never returned

    @model_validator(mode="after")
    def _arms_known(self) -> Experiment:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.model}: arm names repeat")
        if self.shadow is not None and self.shadow not in names:
            raise ValueError(f"experiment {self.model}: shadow arm {self.shadow!r} is not one of its arms")
        if not any(a.weight > 0 for a in self.arms if a.name != self.shadow):
            raise ValueError(f"experiment {self.model}: no arm has traffic weight")
        return self


class CachePattern(Strict):
    name: str
    regex: str  # searched (case-insensitive) in the last user message
    ttl_s: PositiveInt


class Cache(Strict):
    enabled: bool = True
    default_ttl_s: int = Field(300, ge=0)  # questions matching no pattern; 0 = not cached
    patterns: list[CachePattern] = Field(default_factory=list)
    cache_sampled: bool = False  # also cache temperature > 0 answers
    max_entries: PositiveInt = 10_000  # in-process cache (no REDIS_URL)
    redis_timeout_s: float = Field(0.05, gt=0)  # a slow Redis counts as down: served without cache


class Auth(Strict):
    required: bool = True  # every /v1 call needs `Authorization: Bearer ffk_...` (`fibreflow keys create`)
    cache_s: float = Field(10.0, gt=0)  # a key's row is re-read this often: a revoked key stops within cache_s
    stale_s: float = Field(300.0, ge=0)  # database down: a record read this recently is still honoured
    unknown_lookups_per_s: PositiveInt = 20  # database reads for never-seen key ids, all ids together
    unknown_cache_size: PositiveInt = 10_000  # unknown ids remembered (for cache_s), apart from the real keys


class Limits(Strict):
    """Per key and minute, unless the key has its own (`fibreflow keys create --rpm/--tpm`). None = unlimited."""

    requests_per_minute: PositiveInt | None = 120
    tokens_per_minute: PositiveInt | None = 60_000
    redis_timeout_s: float = Field(0.05, gt=0)
    shared_staleness_s: float = Field(1.0, ge=0)  # with Redis: other routers' counts may be this old (0 = exact)


class Audit(Strict):
    enabled: bool = True
    log_prompts: bool = False  # the last user message in the audit row (off: never stored)
    batch_size: PositiveInt = 200
    flush_s: float = Field(1.0, gt=0)


class Fallback(Strict):
    """What answers when an arm's upstream keeps failing, its breaker is open, or the router is overloaded: a
    model an upstream serves under a fixed name (e.g. the base model: faster than a LoRA arm)."""

    upstream: str
    model: str


class Resilience(Strict):
    retries: int = Field(1, ge=0)  # an upstream timeout / refused connection / 5xx is retried this often
    breaker_failures: PositiveInt = 5  # consecutive failures that open an arm's breaker (straight to fallback)
    breaker_reset_s: float = Field(30.0, gt=0)  # then one trial request is let through
    max_in_flight: PositiveInt = 64  # more requests in flight than this: the excess goes to the fallback
    max_latency_s: float = Field(30.0, gt=0)  # recent upstream latency (EWMA) over this: fallback until it drops


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class Period(Strict):
    """A workload period; the first matching period decides the route."""

    name: str
    weekdays: list[Weekday] | None = None  # None = every day
    hours: tuple[int, int] | None = None  # [from, to) local hours; None = all day
    last_days_of_month: PositiveInt | None = None  # e.g. 2 = the last two days of the month
    route: str  # "experiment" (the A/B split), "fallback", or an arm name (all traffic to that arm)


class Schedule(Strict):
    timezone: str = "UTC"
    periods: list[Period] = Field(default_factory=list)


class FibreflowApi(Strict):
    """The frontend's endpoints (/v1/fibreflow/...)."""

    model: str = "fibreflow-assistant"  # the experiment that answers them
    k: int = Field(4, ge=1, le=10)  # records a record search of /ask returns unless the model asks for a number
    max_steps: int = Field(3, ge=1, le=8)  # rounds of tool calls in /ask before the model must answer


class Embeddings(Strict):
    model: str = "bundled"  # all-MiniLM-L6-v2 (384-d), or a local sentence-transformers folder (bge-large)
    upstream: str | None = None  # an upstream's /v1/embeddings instead of the model in process (no torch here)
    revision: str | None = None  # the model's revision, for an upstream that reports none (the records' one)
    cache_ttl_s: PositiveInt = 3600
    max_inputs: PositiveInt = 256


class Router(Strict):
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: PositiveInt = 1_000_000  # every route: refused from Content-Length, counted while reading
    alias_poll_s: float = Field(5.0, gt=0)
    experiments_poll_s: float = Field(5.0, gt=0)  # admin-API changes made on another router are seen this soon
    arm_header: str = "x-fibreflow-arm"  # forces an arm (keys with the qa or admin scope)
    docs: bool = False  # serve /docs and /openapi.json
    metrics_listen: str | None = None  # "host:port": /metrics there without a key (else a metrics-scope key)
    shadow_concurrency: PositiveInt = 8  # shadow copies in flight at most; more are dropped (counted)
    upstreams: dict[str, Upstream]
    experiments: list[Experiment] = Field(default_factory=list)
    cache: Cache = Cache()
    auth: Auth = Auth()
    limits: Limits = Limits()
    audit: Audit = Audit()
    fallback: Fallback | None = None
    resilience: Resilience = Resilience()
    schedule: Schedule = Schedule()
    fibreflow: FibreflowApi = FibreflowApi()
    embeddings: Embeddings = Embeddings()
    cors_origins: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _upstreams_known(self) -> Router:
        for exp in self.experiments:
            for arm in exp.arms:
                if arm.upstream not in self.upstreams:
                    raise ValueError(f"experiment {exp.model}, arm {arm.name}: unknown upstream {arm.upstream!r}")
        if self.fallback is not None and self.fallback.upstream not in self.upstreams:
            raise ValueError(f"fallback: unknown upstream {self.fallback.upstream!r}")
        if self.embeddings.upstream is not None and self.embeddings.upstream not in self.upstreams:
            raise ValueError(f"embeddings: unknown upstream {self.embeddings.upstream!r}")
        arms = {a.name for e in self.experiments for a in e.arms} | {"experiment", "fallback"}
        for period in self.schedule.periods:
            if period.route not in arms:
                raise ValueError(f"schedule {period.name}: route {period.route!r}: not experiment, fallback, an arm")
            if period.route == "fallback" and self.fallback is None:
                raise ValueError(f"schedule {period.name}: routes to the fallback, but no fallback is configured")
        return self


class Vllm(Strict):
    """`fibreflow serve --backend vllm`: the production upstream, started from the registry's serving specs."""

    launcher: list[str] = Field(  # GPU deployments: ["vllm", "serve"]
        default_factory=lambda: [".venv-vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model"]
    )
    host: str = "127.0.0.1"
    port: int = 8002
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 where native here, else fp32
    max_num_seqs: PositiveInt = 32
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enable_prefix_caching: bool = True
    max_model_len: PositiveInt | None = None  # None: the smallest max_context of the served versions
    max_lora_rank: PositiveInt = 64
    max_loras: PositiveInt = 4
    always_enable_lora: bool = True  # also with no adapter yet, so a later promotion can be loaded at run time
    merged_aliases: list[str] = Field(default_factory=list)  # served merged, one vLLM each (faster than LoRA)
    merged_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    replaced_grace_s: float = Field(30.0, ge=0)  # a replaced merged vLLM finishes its requests this long
    tool_call_parser: str | None = "hermes"  # --enable-auto-tool-choice --tool-call-parser; None: no tool calls
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    start_timeout_s: float = Field(600.0, gt=0)


class ServingConfig(Strict):
    # Not set in serving.yaml: `load_serving_config` takes them from their one source (registry.yaml's `name`,
    # models.yaml's `generation.max_new_tokens`).
    registered_model: str = "fibreflow-assistant"
    max_new_tokens: PositiveInt = 128  # answers of requests that name no max_tokens (model server, frontend)
    model_server: ModelServer = ModelServer()
    vllm: Vllm = Vllm()
    router: Router


def load_serving_config(overrides: dict[str, Any] | None = None) -> ServingConfig:
    from fibreflow.registry.registry import load_registry_config
    from fibreflow.training.config import load_catalogue

    derived = {"registered_model": load_registry_config().name}
    derived["max_new_tokens"] = load_catalogue().generation.max_new_tokens
    return load_config(ServingConfig, "serving", derived | (overrides or {}))


def served_name(registered_model: str, version: str | int) -> str:
    """What an upstream (this model server, vLLM) calls a registered version's adapter: `<model>-v<version>`."""
    return f"{registered_model}-v{version}"
