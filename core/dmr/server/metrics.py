"""`GET /metrics`: the server's own series plus every live runner's, merged.

The server's series live in their own `CollectorRegistry` (never the global
one: two apps in one process, as in tests, must not share counters). Requests
are observed by an ASGI middleware, the only place that sees both the first
body byte (time to first token) and the last one (latency) of a streamed
answer without touching the bytes.

Runners are scraped concurrently over their unix sockets at scrape time, each
with a short timeout; their families are re-emitted with `backend`, `model`
and `mode` labels added, one family per name across runners (the text format
forbids a name twice). A runner that does not answer is left out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from quart import Blueprint, Response, current_app, has_request_context, request

from dmr.reference import display_name
from dmr.server.services import get_services

if TYPE_CHECKING:
    from prometheus_client.registry import Collector
    from quart import Quart

    from dmr.records import ProgressEvent
    from dmr.scheduler import RunnerHandle
    from dmr.server.recorder import ExchangeCapture

__all__ = [
    "METRICS_KEY",
    "SCOPE_KEY",
    "ObservingMiddleware",
    "RequestObservation",
    "ServerMetrics",
    "blueprint",
    "counting_pull_bytes",
    "merge_runner_metrics",
    "note_model",
    "register_collector",
]

log = logging.getLogger(__name__)

METRICS_KEY = "dmr_metrics"
SCOPE_KEY = "dmr.observation"
# A runner busy generating still answers /metrics within milliseconds; one
# that takes longer must not hold up the whole scrape.
RUNNER_SCRAPE_TIMEOUT = 2.0
_STREAM_TYPES = ("text/event-stream", "application/x-ndjson")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ADDED_LABELS = ("backend", "model", "mode", "node")

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


@dataclass
class RequestObservation:
    """What is known of one HTTP request, kept in its ASGI scope."""

    started: float
    route: str = "(unmatched)"
    dialect: str = "dmr"
    model: str = ""
    status: int = 0
    streamed: bool = False
    first_byte: float | None = None
    finished: bool = False


def note_model(model: str) -> None:
    """Label the current request with the model it runs (called by the proxy and
    the translating dialects once the model name is known)."""
    if not has_request_context():
        return
    observation = request.scope.get(SCOPE_KEY)
    if isinstance(observation, RequestObservation):
        observation.model = display_name(model)


def register_collector(app: Quart, collector: Collector) -> bool:
    """Add a plugin's Prometheus collector to `app`'s `GET /metrics`; False when the
    server keeps no metrics (`DISABLE_METRICS=1`)."""
    metrics: ServerMetrics | None = app.extensions.get(METRICS_KEY)
    if metrics is None:
        return False
    metrics.registry.register(collector)
    return True


class ServerMetrics:
    """The server's own series and the collectors that read the scheduler."""

    def __init__(self, dialects: dict[str, str]) -> None:
        # blueprint name -> dialect name; core routes are "dmr".
        self.dialects = dialects
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "dmr_requests",
            "HTTP requests answered, by route template, model, API dialect and status.",
            ("route", "model", "dialect", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "dmr_request_duration_seconds",
            "Time from request to the last byte of the answer.",
            ("route", "model", "dialect"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "dmr_time_to_first_token_seconds",
            "Time from request to the first byte of a streamed answer.",
            ("model", "dialect"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "dmr_prompt_tokens",
            "Prompt tokens processed, from the runners' usage or timings.",
            ("model",),
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "dmr_generated_tokens",
            "Tokens generated, from the runners' usage or timings.",
            ("model",),
            registry=self.registry,
        )
        self.direct_streams = Counter(
            "dmr_direct_streams",
            "Streamed answers whose runner offered to write them to the client itself, by"
            " whether the server handed it the connection (handed=true) or relayed them.",
            ("model", "handed"),
            registry=self.registry,
        )
        self.pull_bytes = Counter(
            "dmr_pull_bytes",
            "Bytes downloaded by model pulls.",
            registry=self.registry,
        )

    def finish(self, observation: RequestObservation) -> None:
        observation.finished = True
        labels = (observation.route, observation.model, observation.dialect)
        self.requests.labels(*labels, str(observation.status or 499)).inc()
        self.latency.labels(*labels).observe(time.perf_counter() - observation.started)
        if observation.streamed and observation.model and observation.first_byte is not None:
            self.ttft.labels(observation.model, observation.dialect).observe(
                observation.first_byte - observation.started
            )

    def observe_exchange(self, capture: ExchangeCapture) -> None:
        usage = capture.usage
        if usage is not None:
            prompt, generated = usage
            self.prompt_tokens.labels(capture.model).inc(max(prompt, 0))
            self.generated_tokens.labels(capture.model).inc(max(generated, 0))

    async def before_request(self) -> None:
        observation = request.scope.get(SCOPE_KEY)
        if not isinstance(observation, RequestObservation):
            return
        if request.url_rule is not None:
            observation.route = request.url_rule.rule
        if request.blueprint:
            observation.dialect = self.dialects.get(request.blueprint, "dmr")


def counting_pull_bytes(
    progress: Callable[[ProgressEvent], None],
) -> Callable[[ProgressEvent], None]:
    """`progress` for a pull, also adding each layer's new bytes to `dmr_pull_bytes`."""
    metrics: ServerMetrics | None = current_app.extensions.get(METRICS_KEY)
    if metrics is None:
        return progress
    seen: dict[str | None, int] = {}

    def counted(event: ProgressEvent) -> None:
        if event.type == "progress" and event.layer_current:
            delta = event.layer_current - seen.get(event.layer_id, 0)
            if delta > 0:
                metrics.pull_bytes.inc(delta)
                seen[event.layer_id] = event.layer_current
        progress(event)

    return counted


class ObservingMiddleware:
    """Times every HTTP request at the ASGI level; the bytes pass untouched."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        observation = RequestObservation(started=time.perf_counter())
        # The scope is the dict Quart's `request.scope` is: views find it there.
        scope[SCOPE_KEY] = observation  # type: ignore[literal-required]
        metrics = self.metrics

        async def observed_send(message: Any) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                observation.status = int(message.get("status", 0))
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type":
                        observation.streamed = value.decode("latin-1").startswith(_STREAM_TYPES)
            elif kind == "http.response.body":
                if observation.first_byte is None and message.get("body"):
                    observation.first_byte = time.perf_counter()
                if not message.get("more_body", False) and not observation.finished:
                    metrics.finish(observation)
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            if not observation.finished:
                metrics.finish(observation)  # the client left before the end


# --------------------------------------------------------------------------- runners


async def _scrape(handle: RunnerHandle) -> str | None:
    try:
        response = await handle.client.get("/metrics", timeout=RUNNER_SCRAPE_TIMEOUT)
    except (httpx.HTTPError, OSError) as error:
        log.debug("no metrics from %s runner for %s: %r", handle.backend, handle.model_name, error)
        return None
    if response.status_code != 200:
        return None
    return response.text


def merge_runner_metrics(scraped: Iterable[tuple[RunnerHandle, str]]) -> list[Metric]:
    """The runners' families, one per name, each sample labelled with its runner."""
    families: dict[str, Metric] = {}
    for handle, text in scraped:
        added = {"backend": handle.backend, "model": handle.model_name, "mode": handle.mode.value}
        if handle.node is not None:
            added["node"] = handle.node  # replicas of one model differ by node only
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError as error:
            log.warning("unreadable metrics from %s: %s", handle.model_name, error)
            continue
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for sample in family.samples:
                labels = dict(sample.labels)
                for name in _ADDED_LABELS:
                    # As Prometheus does on a clash: the target's label is kept renamed.
                    if name in labels:
                        labels[f"exported_{name}"] = labels.pop(name)
                labels.update(added)
                merged.add_sample(
                    sample.name, labels, sample.value, sample.timestamp, sample.exemplar
                )
    return list(families.values())


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def _scheduler_families() -> list[Metric]:
    scheduler = get_services().scheduler
    queue = GaugeMetricFamily("dmr_queue_depth", "Requests waiting for runner memory.")
    queue.add_metric([], scheduler.queued)
    queued = scheduler.queue()
    waiting = GaugeMetricFamily(
        "dmr_queue_waiting",
        "Requests waiting for memory, by model.",
        labels=("backend", "model", "mode"),
    )
    oldest = GaugeMetricFamily(
        "dmr_queue_oldest_wait_seconds",
        "How long the longest-waiting request for each model has waited for memory.",
        labels=("backend", "model", "mode"),
    )
    for entry in queued:
        labels = [entry.backend, display_name(entry.model), entry.mode.value]
        waiting.add_metric(labels, entry.waiting)
        oldest.add_metric(labels, entry.oldest_wait)
    waits = HistogramMetricFamily(
        "dmr_queue_wait_seconds",
        "Seconds each queued request waited for memory before it was admitted.",
        labels=("model",),
    )
    for model, histogram in sorted(scheduler.waits.by_model.items()):
        waits.add_metric([model], histogram.cumulative(), sum_value=histogram.total)
    switches = HistogramMetricFamily(
        "dmr_runner_switch_seconds",
        "Seconds from a runner's admission to its readiness, the evicted runners' stop included.",
    )
    switch = scheduler.switch_seconds
    if switch.count:
        switches.add_metric([], switch.cumulative(), sum_value=switch.total)
    items = scheduler.ps()
    loaded = GaugeMetricFamily(
        "dmr_runners_loaded", "Runner processes, by backend and state.", labels=("backend", "state")
    )
    states: dict[tuple[str, str], int] = {}
    for item in items:
        state = "loading" if item["loading"] else "busy" if item["in_use"] else "idle"
        key = (str(item["backend_name"]), state)
        states[key] = states.get(key, 0) + 1
    for (backend, state), count in sorted(states.items()):
        loaded.add_metric([backend, state], count)
    memory = GaugeMetricFamily(
        "dmr_runner_memory_bytes",
        "Memory admitted for each runner (the engine's estimate).",
        labels=("backend", "model", "mode", "device"),
    )
    for item in items:
        memory.add_metric(
            [item["backend_name"], item["model_name"], item["mode"], str(item["device"])],
            float(item["memory"] or 0),
        )
    counters = scheduler.counters
    families: list[Metric] = [queue, waiting, oldest, waits, switches, loaded, memory]
    for name, event, text in (
        ("dmr_runner_loads", "loads", "Runners started and ready."),
        ("dmr_runner_evictions", "evictions", "Idle runners stopped to make room."),
        ("dmr_runner_crashes", "crashes", "Runners that exited on their own."),
    ):
        families.append(CounterMetricFamily(name, text, value=counters.get(event, 0)))
    events = CounterMetricFamily(
        "dmr_scheduler_events", "Every scheduler counter, by event.", labels=("event",)
    )
    for event, count in sorted(counters.items()):
        events.add_metric([event], count)
    families.append(events)
    return families


async def render() -> bytes:
    metrics: ServerMetrics = current_app.extensions[METRICS_KEY]
    handles = get_services().scheduler.runners()
    texts = await asyncio.gather(*(_scrape(handle) for handle in handles))
    scraped = [(handle, text) for handle, text in zip(handles, texts, strict=True) if text]
    extra = CollectorRegistry(auto_describe=False)
    extra.register(_Families(_scheduler_families() + merge_runner_metrics(scraped)))
    return generate_latest(metrics.registry) + generate_latest(extra)


blueprint = Blueprint("dmr_metrics", __name__)


@blueprint.get("/metrics")
async def metrics_route() -> Response:
    return Response(await render(), content_type=CONTENT_TYPE_LATEST)
