"""Prometheus metrics of one engine, with vLLM's meanings under the `pagellm:` prefix.

Each engine owns its own `CollectorRegistry` (not the process-wide default), so several
engines can live in one process (tests, benchmarks) without clashing metric names.
All metric objects are thread-safe: the front end's output thread updates them while
the HTTP server renders them.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pagellm.core.scheduler import SchedulerStats

_LABELS = ["model_name"]

# Bucket edges in seconds. CPU serving is slow, so the upper ends reach minutes.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 20.0, 80.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)


class EngineMetrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str):
            return Gauge(name, doc, _LABELS, registry=r).labels(model_name)

        def counter(name: str, doc: str):
            return Counter(name, doc, _LABELS, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets):
            return Histogram(name, doc, _LABELS, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("pagellm:num_requests_running", "Number of requests in the running batch.")
        self.num_requests_waiting = gauge("pagellm:num_requests_waiting", "Number of requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("pagellm:kv_cache_usage_perc",
                                         "Fraction of KV cache blocks in use (0 = empty, 1 = full).")
        self.prompt_tokens = counter("pagellm:prompt_tokens_total", "Number of prefill (prompt) tokens processed.")
        self.generation_tokens = counter("pagellm:generation_tokens_total", "Number of generated tokens.")
        self.num_preemptions = counter("pagellm:num_preemptions_total", "Cumulative number of preemptions.")
        # Hit rate = hits / queries. In tokens: every prompt token of an admitted request is a query,
        # and those found in the prefix cache are hits.
        self.prefix_cache_queries = counter("pagellm:prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("pagellm:prefix_cache_hits",
                                         "Prompt tokens found in the prefix cache.")
        # Labelled by finish reason as well, so kept unbound.
        self.request_success = Counter("pagellm:request_success_total", "Number of finished requests, by reason.",
                                       _LABELS + ["finished_reason"], registry=r)
        self.time_to_first_token = histogram("pagellm:time_to_first_token_seconds",
                                             "Time from arrival to the first generated token.", _TTFT_BUCKETS)
        self.inter_token_latency = histogram("pagellm:inter_token_latency_seconds",
                                             "Time between consecutive output tokens of a request.", _ITL_BUCKETS)
        self.e2e_request_latency = histogram("pagellm:e2e_request_latency_seconds",
                                             "Time from arrival to the end of a request.", _REQUEST_BUCKETS)
        self.request_queue_time = histogram("pagellm:request_queue_time_seconds",
                                            "Time a request waited before it was first scheduled.", _REQUEST_BUCKETS)
        # Refused before queueing: "queue_full" (admission control), "engine_dead".
        self.request_rejected = Counter("pagellm:request_rejected_total",
                                        "Requests refused before they were queued, by reason.",
                                        _LABELS + ["reason"], registry=r)
        self.engine_restarts = counter("pagellm:engine_restarts_total",
                                       "Times the engine core was restarted after it died.")
        # The core reports running totals; counters move forward by the difference.
        self._last_totals = {"preemptions": 0, "queries": 0, "hits": 0}

    # -- updates ----------------------------------------------------------------------
    def record_scheduler_stats(self, stats: SchedulerStats) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage_perc.set(stats.kv_cache_usage)
        self._advance(self.num_preemptions, "preemptions", stats.num_preemptions_total)
        self._advance(self.prefix_cache_queries, "queries", stats.prefix_cache_queries)
        self._advance(self.prefix_cache_hits, "hits", stats.prefix_cache_hits)

    def _advance(self, counter, key: str, total: int) -> None:
        delta = total - self._last_totals[key]
        if delta > 0:
            counter.inc(delta)
            self._last_totals[key] = total

    def record_first_token(self, ttft: float, num_prompt_tokens: int) -> None:
        self.time_to_first_token.observe(max(ttft, 0.0))
        self.prompt_tokens.inc(num_prompt_tokens)

    def record_generation_tokens(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self.generation_tokens.inc(num_tokens)

    def record_inter_token_latency(self, seconds: float) -> None:
        self.inter_token_latency.observe(max(seconds, 0.0))

    def record_finished(self, finished_reason: str, e2e: Optional[float], queue_time: Optional[float]) -> None:
        self.request_success.labels(self.model_name, finished_reason).inc()
        if e2e is not None:
            self.e2e_request_latency.observe(max(e2e, 0.0))
        if queue_time is not None:
            self.request_queue_time.observe(max(queue_time, 0.0))

    def record_rejected(self, reason: str) -> None:
        self.request_rejected.labels(self.model_name, reason).inc()

    def record_engine_restart(self) -> None:
        self.engine_restarts.inc()

    # -- exposition -------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)
