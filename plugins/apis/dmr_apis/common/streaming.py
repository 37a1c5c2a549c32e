"""Streams: reading the runner's OpenAI SSE, writing SSE or NDJSON to clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

from quart import Response

__all__ = ["encode_event", "iter_sse_json", "ndjson_line", "stream_response"]


async def iter_sse_json(lines: AsyncIterable[str]) -> AsyncIterator[dict[str, Any]]:
    """Each `data:` payload of an OpenAI-style SSE stream, decoded, until `[DONE]`."""
    async for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments, `event:` names
        # OpenAI-style streams carry each event on a single data line.
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        if payload:
            event = json.loads(payload)
            if isinstance(event, dict):
                yield event


def encode_event(event: str | None, data: dict[str, Any]) -> bytes:
    """One SSE event; `event: name` first when the dialect names its events."""
    text = json.dumps(data, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {text}\n\n".encode()


def ndjson_line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def stream_response(
    body: AsyncIterator[bytes],
    mimetype: str,
    *,
    on_close: Callable[[], Awaitable[None]] | None = None,
) -> Response:
    """A streamed answer; `on_close` runs however it ends (a client leaving included).

    Quart closes only the iterator it was given, not the generators that one
    was reading, so the runner call is closed here explicitly.
    """

    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for chunk in body:
                yield chunk
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
            if on_close is not None:
                await on_close()

    response = Response(guarded(), mimetype=mimetype)
    # Quart cuts every response body at RESPONSE_TIMEOUT (60 s) unless told otherwise;
    # a long generation must not be truncated.
    response.timeout = None
    response.headers["Cache-Control"] = "no-cache"
    if mimetype == "text/event-stream":
        response.headers["X-Accel-Buffering"] = "no"
    return response
