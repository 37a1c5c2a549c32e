"""Streams to clients: SSE events and NDJSON lines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from quart import Response

__all__ = ["encode_event", "ndjson_line", "stream_response"]


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
