"""Prometheus metrics of one engine, with vLLM's meanings under the `pagellm:` prefix.

Each engine owns its own `CollectorRegistry` (not the process-wide default), so several
engines can live in one process (tests, benchmarks) without clashing metric names.
All metric objects are thread-safe: the front end's output thread updates them while
the HTTP server renders them.

What an engine core reports (running / waiting / KV usage gauges, preemption and prefix-cache
counters) carries an `engine` label as well, the core's data-parallel rank ("0" without data
parallelism), as vLLM labels them; the front end's own metrics (tokens, latencies, requests) are
for the whole server.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pagellm.core.scheduler import SchedulerStats

_LABELS = ["model_name"]
_CORE_LABELS = ["model_name", "engine"]

# Bucket edges in seconds. CPU serving is slow, so the upper ends reach minutes.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 20.0, 80.0)
_COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)


class EngineMetrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, num_engines: int = 1) -> None:
        self.model_name = model_name
        self.num_engines = num_engines
        self.registry = CollectorRegistry()
        r = self.registry

        def per_core(metric) -> list:
            # Every core's child exists from the start, so each shows 0 before its first report.
            return [metric.labels(model_name, str(i)) for i in range(num_engines)]

        def core_gauge(name: str, doc: str) -> list:
            return per_core(Gauge(name, doc, _CORE_LABELS, registry=r))

        def core_counter(name: str, doc: str) -> list:
            return per_core(Counter(name, doc, _CORE_LABELS, registry=r))

        def gauge(name: str, doc: str):
            return Gauge(name, doc, _LABELS, registry=r).labels(model_name)

        def counter(name: str, doc: str):
            return Counter(name, doc, _LABELS, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets):
            return Histogram(name, doc, _LABELS, buckets=buckets, registry=r).labels(model_name)

        # One child per engine core (index = its data-parallel rank).
        self.num_requests_running = core_gauge("pagellm:num_requests_running",
                                               "Number of requests in the running batch.")
        # Per LoRA adapter: requests running / waiting under it (an adapter's series drop to 0 when idle).
        self.lora_requests = Gauge("pagellm:lora_requests", "Requests per LoRA adapter, by state.",
                                   [*_CORE_LABELS, "lora_name", "state"], registry=r)
        self._lora_seen: set[tuple[str, str, str]] = set()
        self.num_requests_waiting = core_gauge("pagellm:num_requests_waiting",
                                               "Number of requests waiting to be scheduled.")
        self.kv_cache_usage_perc = core_gauge("pagellm:kv_cache_usage_perc",
                                              "Fraction of KV cache blocks in use (0 = empty, 1 = full).")
        self.prompt_tokens = counter("pagellm:prompt_tokens_total", "Number of prefill (prompt) tokens processed.")
        self.generation_tokens = counter("pagellm:generation_tokens_total", "Number of generated tokens.")
        self.num_preemptions = core_counter("pagellm:num_preemptions_total", "Cumulative number of preemptions.")
        # Hit rate = hits / queries. In tokens: every prompt token of an admitted request is a query,
        # and those found in the prefix cache are hits.
        self.prefix_cache_queries = core_counter("pagellm:prefix_cache_queries",
                                                 "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = core_counter("pagellm:prefix_cache_hits",
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
        # Structured outputs: compiles are those of the front end's up-front check (cache misses only).
        self.grammar_compile_time = histogram("pagellm:grammar_compile_seconds",
                                              "Time to compile a structured-outputs constraint (cache misses).",
                                              _COMPILE_BUCKETS)
        self.structured_output_requests = Counter("pagellm:structured_output_requests_total",
                                                  "Requests with a structured-outputs constraint, by its kind.",
                                                  _LABELS + ["constraint"], registry=r)
        self.engine_restarts = counter("pagellm:engine_restarts_total",
                                       "Times the engine core was restarted after it died.")
        # Speculative decoding: verification rows, proposed and accepted tokens, accepted per position
        # (acceptance rate = accepted / draft tokens; mean accepted length = 1 + accepted / drafts).
        self.spec_num_drafts = core_counter("pagellm:spec_decode_num_drafts_total",
                                            "Requests' verification steps with speculative proposals.")
        self.spec_num_draft_tokens = core_counter("pagellm:spec_decode_num_draft_tokens_total",
                                                  "Speculative tokens proposed and verified.")
        self.spec_num_accepted_tokens = core_counter("pagellm:spec_decode_num_accepted_tokens_total",
                                                     "Speculative tokens accepted.")
        self.spec_accepted_per_pos = Counter("pagellm:spec_decode_num_accepted_tokens_per_pos",
                                             "Speculative tokens accepted, by proposal position (0 = first).",
                                             [*_CORE_LABELS, "position"], registry=r)
        # Each core reports running totals; counters move forward by the difference (per core).
        self._last_totals = [{"preemptions": 0, "queries": 0, "hits": 0, "drafts": 0, "draft_tokens": 0,
                              "accepted": 0} for _ in range(num_engines)]

    # -- updates ----------------------------------------------------------------------
    def record_scheduler_stats(self, stats: SchedulerStats, engine: int = 0) -> None:
        """Core `engine`'s snapshot (each core's reports come from one thread, so per-core state needs no lock)."""
        self.num_requests_running[engine].set(stats.num_running)
        self.num_requests_waiting[engine].set(stats.num_waiting)
        self.kv_cache_usage_perc[engine].set(stats.kv_cache_usage)
        self._record_lora(stats, str(engine))
        totals = self._last_totals[engine]
        self._advance(self.num_preemptions[engine], totals, "preemptions", stats.num_preemptions_total)
        self._advance(self.prefix_cache_queries[engine], totals, "queries", stats.prefix_cache_queries)
        self._advance(self.prefix_cache_hits[engine], totals, "hits", stats.prefix_cache_hits)
        spec = stats.spec_decode
        if spec is not None:
            self._advance(self.spec_num_drafts[engine], totals, "drafts", spec.num_drafts)
            self._advance(self.spec_num_draft_tokens[engine], totals, "draft_tokens", spec.num_draft_tokens)
            self._advance(self.spec_num_accepted_tokens[engine], totals, "accepted", spec.num_accepted_tokens)
            for position, total in enumerate(spec.accepted_per_position):
                totals.setdefault(f"pos{position}", 0)
                self._advance(self.spec_accepted_per_pos.labels(self.model_name, str(engine), str(position)),
                              totals, f"pos{position}", total)

    @staticmethod
    def _advance(counter, totals: dict, key: str, total: int) -> None:
        delta = total - totals[key]
        if delta > 0:
            counter.inc(delta)
        # A restarted core counts from 0 again: follow it down, so its next increments count.
        totals[key] = total

    def _record_lora(self, stats: SchedulerStats, engine: str) -> None:
        now = {(engine, name, "running"): n for name, n in stats.lora_running.items()}
        now.update({(engine, name, "waiting"): n for name, n in stats.lora_waiting.items()})
        for key in self._lora_seen | set(now):
            if key[0] == engine:
                self.lora_requests.labels(self.model_name, *key).set(now.get(key, 0))
        self._lora_seen |= set(now)

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

    def record_grammar_compile(self, seconds: float) -> None:
        self.grammar_compile_time.observe(max(seconds, 0.0))

    def record_structured_request(self, kind: str) -> None:
        self.structured_output_requests.labels(self.model_name, kind).inc()

    def record_engine_restart(self) -> None:
        self.engine_restarts.inc()

    # -- exposition -------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)
