"""The server's Prometheus metrics: queue and cache gauges, latency histograms, token and request counters.

Taught in notebook 15 (serving and its metrics).  Each app gets its own
``CollectorRegistry`` (not prometheus_client's global one), so a notebook or a
test can run several servers in one process.  Every name starts with ``llmlab_``;
``GET /metrics`` serves them in Prometheus' text format.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Time to first token: a millisecond on a GPU with an empty queue … a minute for a long CPU prefill in a queue."""
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Time per output token: well under 10 ms on a GPU, tens to hundreds of ms for a big batch on a CPU."""
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""End-to-end latency, arrival to last token."""
FINISH_REASONS = ("stop", "length", "abort")


class ServerMetrics:
    """Every metric of one server, in its own registry (notebook 15); the engine loop calls the methods."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.running = Gauge("llmlab_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("llmlab_requests_waiting", "Requests waiting to be scheduled (or preempted).", registry=r)
        self.blocks_used = Gauge("llmlab_kv_blocks_used", "KV-cache blocks held by requests.", registry=r)
        self.blocks_free = Gauge("llmlab_kv_blocks_free", "KV-cache blocks free (cached prefixes included).",
                                 registry=r)
        self.prefix_hit_rate = Gauge("llmlab_prefix_cache_hit_rate",
                                     "Share of prompt tokens served from the prefix cache since start.", registry=r)
        self.ttft = Histogram("llmlab_time_to_first_token_seconds", "Arrival to first output token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("llmlab_time_per_output_token_seconds", "Mean gap between output tokens of a request.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("llmlab_e2e_request_latency_seconds", "Arrival to the request's end.",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llmlab_prompt_tokens", "Prompt tokens received.", registry=r)
        self.generation_tokens = Counter("llmlab_generation_tokens", "Tokens generated.", registry=r)
        self.requests_finished = Counter("llmlab_requests_finished", "Requests finished, by finish reason.",
                                         ["finish_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.requests_finished.labels(reason)

    # -- called by the engine loop ------------------------------------------------------------

    def prompt(self, n: int) -> None:
        self.prompt_tokens.inc(n)

    def generated(self, n: int) -> None:
        if n:
            self.generation_tokens.inc(n)

    def finished(self, sequence, reason: str) -> None:
        self.requests_finished.labels(reason).inc()
        if sequence.ttft is not None:
            self.ttft.observe(sequence.ttft)
        if sequence.tpot is not None:
            self.tpot.observe(sequence.tpot)
        if sequence.finish_time is not None:
            self.e2e.observe(sequence.finish_time - sequence.arrival_time)

    def engine_state(self, engine) -> None:
        stats = engine.stats()
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.blocks_free.set(stats["free_blocks"])
        self.blocks_used.set(stats["total_blocks"] - stats["free_blocks"])
        self.prefix_hit_rate.set(stats["prefix_hit_rate"])

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
