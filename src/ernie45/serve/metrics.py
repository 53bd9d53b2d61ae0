"""Prometheus metrics of the server (prometheus_client), named after vLLM's with an `ernie45_` prefix.

Each app owns its own `CollectorRegistry`, so several servers (or tests) in one process never collide.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # the `*_created` timestamp series only add noise to every scrape

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
_TPOT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)


class ServerMetrics:
    """The counters, gauges and histograms the engine and the HTTP layer update."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "ernie45_requests",
            "Finished generation requests by outcome (stop, length, abort, timeout, error)",
            ["outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "ernie45_requests_rejected", "Requests refused because the queue was full", registry=r
        )
        self.prompt_tokens = Counter("ernie45_prompt_tokens", "Prefilled prompt tokens", registry=r)
        self.generation_tokens = Counter("ernie45_generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge("ernie45_num_requests_running", "Sequences in the decode batch", registry=r)
        self.waiting = Gauge(
            "ernie45_num_requests_waiting", "Sequences queued for KV-cache blocks", registry=r
        )
        self.kv_usage = Gauge(
            "ernie45_kv_cache_usage_perc", "Fraction of KV-cache blocks in use by sequences (0-1)", registry=r
        )
        self.prefix_queries = Counter(
            "ernie45_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            "ernie45_prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled)", registry=r
        )
        self.preemptions = Counter(
            "ernie45_num_preemptions",
            "Sequences preempted (requeued) because the KV cache was full",
            registry=r,
        )
        self.ttft = Histogram(
            "ernie45_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "ernie45_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "ernie45_e2e_request_latency_seconds",
            "Arrival to last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "ernie45_request_queue_time_seconds", "Arrival to prefill", buckets=_LATENCY_BUCKETS, registry=r
        )
        # vLLM's spec-decode counters: verification passes with drafts, draft tokens scored, drafts accepted
        self.spec_drafts = Counter(
            "ernie45_spec_decode_num_drafts", "Speculative verification passes (one per draft run)", registry=r
        )
        self.spec_draft_tokens = Counter(
            "ernie45_spec_decode_num_draft_tokens", "Draft tokens scored by the target model", registry=r
        )
        self.spec_accepted_tokens = Counter(
            "ernie45_spec_decode_num_accepted_tokens", "Draft tokens the target model accepted", registry=r
        )
        self.spec_accepted_per_pos = Counter(
            "ernie45_spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafts by their position in the draft (0 = the first)",
            ["position"],
            registry=r,
        )
        self.http = Counter(
            "ernie45_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
