"""The `llamacpp:*` Prometheus series, read from the generator's counters at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dmr_llamacpp.huge_pages import anon_huge_page_bytes
from dmr_llamacpp.runner.batching import GeneratorStats
from dmr_llamacpp.runner.q4_1_gemm import products_computed

__all__ = ["render_metrics"]


class _StatsCollector(Collector):
    # Subclassed, not only shaped like one: `Collector` is an ABC in some
    # prometheus_client releases (a Protocol in others), where shape is not enough.
    def __init__(
        self,
        stats: Callable[[], GeneratorStats],
        threads: int,
        yielded_steps: int,
        extra_buffers: bool,
    ) -> None:
        self._stats = stats
        self._threads = threads
        self._yielded_steps = yielded_steps
        self._extra_buffers = extra_buffers

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield CounterMetricFamily(
            "llamacpp:prompt_tokens", "Prompt tokens processed.", value=stats.prompt_tokens_total
        )
        yield CounterMetricFamily(
            "llamacpp:tokens_predicted", "Tokens generated.", value=stats.tokens_predicted_total
        )
        prompt_rate = (
            stats.prompt_tokens_total / stats.prompt_seconds_total
            if stats.prompt_seconds_total
            else 0.0
        )
        predicted_rate = (
            stats.tokens_predicted_total / stats.predicted_seconds_total
            if stats.predicted_seconds_total
            else 0.0
        )
        yield GaugeMetricFamily(
            "llamacpp:prompt_tokens_seconds",
            "Average prompt throughput in tokens/s.",
            value=prompt_rate,
        )
        yield GaugeMetricFamily(
            "llamacpp:predicted_tokens_seconds",
            "Average generation throughput in tokens/s.",
            value=predicted_rate,
        )
        yield GaugeMetricFamily(
            "llamacpp:kv_cache_usage_ratio",
            "KV cache usage (1 = full).",
            value=stats.kv_cells_used / max(1, stats.kv_cells_total),
        )
        yield GaugeMetricFamily(
            "llamacpp:requests_processing", "Requests in a slot.", value=stats.requests_processing
        )
        yield from _slot_gauges(stats)
        yield CounterMetricFamily(
            "llamacpp:draft_tokens",
            "Tokens proposed by the speculative draft model.",
            value=stats.draft_tokens_total,
        )
        yield CounterMetricFamily(
            "llamacpp:draft_tokens_accepted",
            "Draft tokens the model accepted.",
            value=stats.draft_tokens_accepted_total,
        )
        yield CounterMetricFamily(
            "llamacpp:decode_steps",
            "Batches decoded: each holds every busy slot's next tokens and pending prompts.",
            value=stats.decode_steps,
        )
        yield CounterMetricFamily(
            "llamacpp:step_seconds",
            "Seconds spent in decode steps: building the batch, llama_decode, sampling.",
            value=stats.step_seconds_total,
        )
        yield CounterMetricFamily(
            "llamacpp:decode_seconds",
            "Seconds of those inside llama_decode (the rest is Python around it).",
            value=stats.decode_seconds_total,
        )
        yield CounterMetricFamily(
            "llamacpp:batch_tokens",
            "Tokens decoded in those steps (generated and prompt tokens together).",
            value=stats.batch_tokens_total,
        )
        yield GaugeMetricFamily(
            "llamacpp:requests_deferred",
            "Requests waiting for a slot.",
            value=stats.requests_deferred,
        )
        yield CounterMetricFamily(
            "llamacpp:preemptions",
            "Batch requests that gave their slot to an interactive request (docs/batch.md).",
            value=stats.preemptions_total,
        )
        yield CounterMetricFamily(
            "llamacpp:lone_starts",
            "Requests an idle runner started without waiting for the rest of a burst,"
            " because the server saw them come alone (x-dmr-lone).",
            value=stats.lone_starts_total,
        )
        yield GaugeMetricFamily(
            "llamacpp:host_cache_prompts",
            "Prompts whose KV cells are kept in host memory (--cache-ram).",
            value=stats.host_cache_prompts,
        )
        yield GaugeMetricFamily(
            "llamacpp:host_cache_bytes",
            "Bytes of host memory those prompts take.",
            value=stats.host_cache_bytes,
        )
        yield from self._compute_gauges()

    def _compute_gauges(self) -> Iterator[Metric]:
        """How the model computes: its threads now, and where its weights are."""
        yield GaugeMetricFamily(
            "llamacpp:threads",
            "Threads llama_decode computes with now: fewer while other runners share the"
            " CPU's cores (POST /cpu-share) or other processes keep cores busy; 0 while"
            " loading.",
            value=self._threads,
        )
        yield CounterMetricFamily(
            "llamacpp:steps_yielded",
            "Decode steps computed with fewer threads than the share allows, because other"
            " processes kept cores busy (docs/scheduler.md, 'Busy neighbours').",
            value=self._yielded_steps,
        )
        yield GaugeMetricFamily(
            "llamacpp:extra_weight_buffers",
            "1 when the weights were loaded into llama.cpp's extra buffers (AMX, repacked),"
            " 0 when this llama.cpp build crashes with them or they are turned off"
            " (docs/scheduler.md, 'Extra weight buffers').",
            value=int(self._extra_buffers),
        )
        yield GaugeMetricFamily(
            "llamacpp:huge_page_bytes",
            "Bytes of the runner's memory in transparent huge pages: its weights, where it"
            " read them into huge pages (docs/scheduler.md, 'Weights in huge pages').",
            value=anon_huge_page_bytes(),
        )
        yield CounterMetricFamily(
            "llamacpp:q4_1_batched_products",
            "Matrix products of Q4_1 weights computed by dmr's batched kernel instead of"
            " llama.cpp's row-by-row one; 0 where it is off (docs/scheduler.md, 'Batched"
            " Q4_1 products').",
            value=products_computed(),
        )


def _slot_gauges(stats: GeneratorStats) -> Iterator[Metric]:
    """The slots held and how many are open (runner/slot_limit.py)."""
    yield GaugeMetricFamily(
        "llamacpp:slots", "Slots (KV streams) the runner holds.", value=stats.slots
    )
    yield GaugeMetricFamily(
        "llamacpp:slots_allowed",
        "Slots that may hold a request now: all, or as many as the measured step cost "
        "says pay (--adaptive-slots).",
        value=stats.slots_allowed,
    )


def render_metrics(
    stats: Callable[[], GeneratorStats],
    threads: int = 0,
    yielded_steps: int = 0,
    extra_buffers: bool = False,
) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats, threads, yielded_steps, extra_buffers))
    return generate_latest(registry)
