"""The request recorder behind `GET /engines/requests`: the last request/response
pairs per model, and a capture that observes a proxied exchange.

The proxy only appends the bytes it forwards to a bounded buffer
(`ExchangeCapture.feed`); parsing the SSE, folding the stream into one answer
and reading the token counts happen once, after the stream has ended, so the
hot path stays a plain byte copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from quart import Blueprint, Response, current_app, has_app_context, jsonify, request

from dmr.direct_streams import SUMMARY_HEAD_BYTES, SUMMARY_TAIL_BYTES
from dmr.server.services import get_services

log = logging.getLogger(__name__)

__all__ = [
    "ExchangeCapture",
    "RequestRecorder",
    "blueprint",
    "fold_events",
    "fold_sse",
    "start_capture",
    "truncate_media",
]

# Pairs kept per model (DMR keeps 10).
HISTORY_PER_MODEL = 10
# Bytes of a streamed answer kept for folding; its end (usage, timings) is kept
# apart so a long generation still reports its token counts.
# The same as a direct stream's runner keeps for the server (dmr/direct_streams.py).
_HEAD_BYTES = SUMMARY_HEAD_BYTES
_TAIL_BYTES = SUMMARY_TAIL_BYTES
# Followers that stop reading lose events rather than hold memory.
_FOLLOWER_QUEUE = 100

# Base64 payloads (images, audio) longer than this are cut in recorded bodies.
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{512,}={0,2}".decode())
_KEPT_BASE64 = 32


def truncate_media(value: Any) -> Any:
    """`value` with every long base64 run (data URIs, `b64_json`) cut short."""
    if isinstance(value, str):
        if len(value) < 512:
            return value
        return _BASE64_RUN.sub(
            lambda m: f"{m.group()[:_KEPT_BASE64]}...[{len(m.group())} base64 chars truncated]",
            value,
        )
    if isinstance(value, dict):
        return {key: truncate_media(item) for key, item in value.items()}
    if isinstance(value, list):
        return [truncate_media(item) for item in value]
    return value


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _sse_events(raw: bytes) -> Iterator[dict[str, Any]]:
    for line in raw.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            continue
        try:
            event = json.loads(payload)
        except ValueError:
            continue  # a line cut by the bounded buffer
        if isinstance(event, dict):
            yield event


def fold_sse(raw: bytes) -> dict[str, Any]:
    """One OpenAI-style answer from the `data:` events of a stream."""
    return fold_events(_sse_events(raw))


def fold_events(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One answer from OpenAI-style stream chunks: the content deltas joined."""
    content: list[str] = []
    reasoning: list[str] = []
    folded: dict[str, Any] = {}
    for event in events:
        for key in ("id", "object", "model", "created"):
            if key in event:
                folded.setdefault(key, event[key])
        for key in ("usage", "timings", "error"):
            if event.get(key):
                folded[key] = event[key]
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content.append(str(delta.get("content") or ""))
                reasoning.append(str(delta.get("reasoning_content") or ""))
            elif isinstance(choice.get("text"), str):
                content.append(choice["text"])
            if choice.get("finish_reason"):
                folded["finish_reason"] = choice["finish_reason"]
    folded["content"] = "".join(content)
    if any(reasoning):
        folded["reasoning_content"] = "".join(reasoning)
    return folded


@dataclass
class ExchangeCapture:
    """One proxied exchange, observed while its bytes go through."""

    model: str
    model_id: str
    backend: str
    mode: str
    path: str
    request_body: bytes | Mapping[str, Any]
    on_done: Callable[[ExchangeCapture], None]
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    status: int = 0
    streamed: bool = False
    truncated: bool = False
    response: Any = None
    _head: bytearray = field(default_factory=bytearray, repr=False)
    _tail: bytearray = field(default_factory=bytearray, repr=False)
    _done: bool = False

    def feed(self, chunk: bytes) -> None:
        """A streamed chunk as forwarded: a bounded copy, nothing parsed."""
        if len(self._head) < _HEAD_BYTES:
            self._head += chunk
            return
        self.truncated = True
        self._tail += chunk
        if len(self._tail) > 2 * _TAIL_BYTES:
            del self._tail[:-_TAIL_BYTES]

    def finish(
        self,
        status: int,
        body: bytes | None = None,
        events: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        """The exchange ended: `body` is a whole answer, `events` a stream decoded by
        the caller, and with neither the stream fed chunk by chunk."""
        if self._done:
            return
        self._done = True
        self.status = status
        if body is not None:
            self.response = _decode(body)
        elif events is not None:
            self.streamed = True
            self.response = fold_events(events)
        else:
            self.streamed = True
            folded = fold_sse(bytes(self._head))
            if self.truncated:
                # The tail's first line is likely cut; fold_sse skips it.
                end = fold_sse(bytes(self._tail[-_TAIL_BYTES:]))
                for key in ("usage", "timings", "finish_reason", "error"):
                    if key in end:
                        folded[key] = end[key]
                folded["content"] += "...[truncated]"
            self.response = folded
        self.on_done(self)

    @property
    def usage(self) -> tuple[int, int] | None:
        """(prompt tokens, generated tokens) from `usage` or llama-server's `timings`."""
        answer = self.response
        if not isinstance(answer, dict):
            return None
        usage = answer.get("usage")
        if isinstance(usage, dict) and (
            "prompt_tokens" in usage or "completion_tokens" in usage or "input_tokens" in usage
        ):
            prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
            generated = usage.get("completion_tokens", usage.get("output_tokens", 0))
            return int(prompt or 0), int(generated or 0)
        timings = answer.get("timings")
        if isinstance(timings, dict):
            return int(timings.get("prompt_n") or 0), int(timings.get("predicted_n") or 0)
        return None

    def record(self, number: int) -> dict[str, Any]:
        """The JSON item `GET /engines/requests` lists."""
        body = self.request_body
        request = truncate_media(_decode(body) if isinstance(body, bytes) else dict(body))
        return {
            "id": number,
            "model": self.model,
            "model_id": self.model_id,
            "backend": self.backend,
            "mode": self.mode,
            "path": self.path,
            "status": self.status,
            "stream": self.streamed,
            "started_at": datetime.fromtimestamp(self.started_at, UTC).isoformat(),
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
            "request": request,
            "response": truncate_media(self.response),
        }


class RequestRecorder:
    """The last `HISTORY_PER_MODEL` exchanges per model, and live followers."""

    def __init__(self, per_model: int = HISTORY_PER_MODEL) -> None:
        self._per_model = per_model
        self._history: dict[str, deque[dict[str, Any]]] = {}
        self._followers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._numbers = itertools.count(1)

    def add(self, capture: ExchangeCapture) -> None:
        item = capture.record(next(self._numbers))
        history = self._history.setdefault(capture.model_id, deque(maxlen=self._per_model))
        history.append(item)
        for queue in list(self._followers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(item)

    def items(self, model_id: str | None = None) -> list[dict[str, Any]]:
        """Recorded exchanges, oldest first; only `model_id`'s when given."""
        histories = (
            [self._history.get(model_id, deque())]
            if model_id is not None
            else list(self._history.values())
        )
        merged = [item for history in histories for item in history]
        return sorted(merged, key=lambda item: int(item["id"]))

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue of exchanges recorded from now on; `unsubscribe` it when done."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_FOLLOWER_QUEUE)
        self._followers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._followers.discard(queue)


# --------------------------------------------------------------------------- wiring

# `app.extensions` key: callables each finished exchange is handed to (the
# recorder, the metrics); the app factory fills it.
OBSERVERS_KEY = "dmr_exchange_observers"
RECORDER_KEY = "dmr_recorder"


def start_capture(
    *,
    model: str,
    model_id: str,
    backend: str,
    mode: str,
    path: str,
    body: bytes | Mapping[str, Any],
    extensions: Mapping[str, Any] | None = None,
) -> ExchangeCapture | None:
    """A capture for an exchange the proxy is about to forward; None when nobody
    observes exchanges (an app built without the recorder).

    `extensions` is the app's, for callers outside a Quart app context (the
    server's raw ASGI proxy routes); by default the current app's.
    """
    if extensions is None:
        if not has_app_context():
            return None
        extensions = current_app.extensions
    observers: list[Callable[[ExchangeCapture], None]] = extensions.get(OBSERVERS_KEY, [])
    if not observers:
        return None

    def done(capture: ExchangeCapture) -> None:
        # Observing must never break the exchange it observes.
        for observer in observers:
            try:
                observer(capture)
            except Exception:
                log.exception("observing a request to %s failed", capture.model)

    return ExchangeCapture(
        model=model,
        model_id=model_id,
        backend=backend,
        mode=mode,
        path=path,
        request_body=body,
        on_done=done,
    )


blueprint = Blueprint("dmr_requests_api", __name__)


@blueprint.get("/engines/requests")
async def recorded_requests() -> Response:
    """The last exchanges per model; SSE of new ones with `Accept: text/event-stream`,
    as Docker Model Runner sends them (pkg/metrics/openai_recorder.go): each new one an
    `event: new_request`, and first, with `?include_existing=true`, the recorded ones,
    each an `event: existing_request`."""
    recorder: RequestRecorder = current_app.extensions[RECORDER_KEY]
    wanted = request.args.get("model") or None
    model_id = get_services().store.get(wanted).id if wanted else None
    if "text/event-stream" not in request.headers.get("accept", ""):
        return jsonify(recorder.items(model_id))
    include_existing = request.args.get("include_existing") == "true"

    def event(kind: str, item: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: ".encode() + json.dumps(item).encode() + b"\n\n"

    async def events() -> AsyncIterator[bytes]:
        # Subscribed before the history is sent, so nothing falls in between.
        queue = recorder.subscribe()
        try:
            if include_existing:
                for item in recorder.items(model_id):
                    yield event("existing_request", item)
            while True:
                item = await queue.get()
                if model_id is None or item["model_id"] == model_id:
                    yield event("new_request", item)
        finally:
            recorder.unsubscribe(queue)

    response = Response(events(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.timeout = None
    return response
