"""Prometheus metrics of the router, per arm (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "fibreflow_router_"
        self.requests = Counter(p + "requests", "Requests answered", ["arm", "model_version", "status"], registry=r)
        self.errors = Counter(p + "errors", "Requests that failed", ["arm", "kind"], registry=r)
        self.latency = Histogram(
            p + "request_seconds", "Time to the whole answer", ["arm"], buckets=LATENCY, registry=r
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Time to the first streamed token", ["arm"], buckets=LATENCY, registry=r
        )
        self.tokens = Counter(p + "completion_tokens", "Completion tokens generated", ["arm"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens sent", ["arm"], registry=r)
        self.tokens_per_s = Histogram(
            p + "tokens_per_second",
            "Completion tokens per second of a request",
            ["arm"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.cache = Counter(
            p + "cache", "Cache lookups by result (hit, miss, bypass, error)", ["arm", "result"], registry=r
        )
        self.cache_up = Gauge(
            p + "cache_backend_up", "1 while the cache backend answers, 0 after it failed", ["backend"], registry=r
        )
        self.retries = Counter(p + "upstream_retries", "Upstream calls retried", ["arm", "upstream"], registry=r)
        self.fallbacks = Counter(p + "fallbacks", "Requests served by the fallback, by why", ["reason"], registry=r)
        self.fallbacks.labels("upstream_error")
        self.shadow = Counter(p + "shadow", "Shadow copies by outcome", ["arm", "outcome"], registry=r)
        self.shadow_similarity = Histogram(
            p + "shadow_similarity",
            "Shadow answer vs returned answer (0..1)",
            ["arm"],
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=r,
        )
        self.feedback = Counter(p + "feedback", "Feedback received", ["arm", "model_version"], registry=r)
        self.feedback_score = Histogram(
            p + "feedback_score",
            "Feedback score (thumbs up = 1, down = 0)",
            ["arm", "model_version"],
            buckets=(0.25, 0.5, 0.75, 1.0),
            registry=r,
        )
        self.limiter_errors = Gauge(p + "limiter_sync_errors", "Failed exchanges with the limits' Redis", registry=r)
        self.alias_moves = Counter(p + "alias_moves", "Registry alias moves picked up", ["alias"], registry=r)
        self.alias_read_errors = Counter(
            p + "alias_read_errors", "Registry reads that failed (the arms keep their last known version)", registry=r
        )
        self.audit_rows = Counter(
            p + "audit_rows", "Audit rows by outcome (written, dropped_invalid, dropped_overflow)", ["outcome"],
            registry=r,
        )  # fmt: skip
        for outcome in ("written", "dropped_invalid", "dropped_overflow"):  # at 0 from the start: increase() sees
            self.audit_rows.labels(outcome)  # the first drop
        self.audit_pending = Gauge(p + "audit_rows_pending", "Audit rows waiting to be written", registry=r)
        self.breaker_open = Gauge(
            p + "breaker_open", "1 while an upstream model's circuit breaker is open", ["upstream", "model"], registry=r
        )
        self.keys_stale = Gauge(
            p + "keys_stale_served", "Keys honoured from their last good record while the database was down",
            registry=r,
        )  # fmt: skip
        self.shadow_dropped = Counter(
            p + "shadow_dropped", "Shadow copies not sent: too many already in flight", ["arm"], registry=r
        )


TOKEN_TIME = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class ModelMetrics:
    """Prometheus metrics of the local model server's engine (vLLM's `vllm:*` set, under our prefix): queue wait,
    rows per batch, time to first token and per output token, tokens generated (rate() of it: tokens/s)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "fibreflow_model_"
        self.waiting = Gauge(p + "requests_waiting", "Requests queued for a batch", registry=r)
        self._queues: list[Any] = []  # of every engine that reports here (a model server may run several)
        self.waiting.set_function(lambda: sum(q.qsize() for q in self._queues))
        self.running = Gauge(p + "requests_running", "Requests in the batch being generated", registry=r)
        self.queue_wait = Histogram(
            p + "queue_wait_seconds", "Time from arrival to joining a batch", ["model"], buckets=LATENCY, registry=r
        )
        self.batch_size = Histogram(
            p + "batch_size", "Rows of each batch generated", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Time from arrival to the first token", ["model"], buckets=LATENCY,
            registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            p + "time_per_output_token_seconds", "Time per output token after the first", ["model"],
            buckets=TOKEN_TIME, registry=r,
        )  # fmt: skip
        self.request_time = Histogram(
            p + "request_seconds", "Time from arrival to the last token", ["model"], buckets=LATENCY, registry=r
        )
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of requests served", ["model"], registry=r)
        self.finished = Counter(
            p + "requests", "Requests ended, by reason (stop, length, cancelled, error)", ["model", "reason"],
            registry=r,
        )  # fmt: skip

    def watch_queue(self, q: Any) -> None:
        """Count `q`'s requests as waiting."""
        self._queues.append(q)
