"""Streamed generations straight from the ASGI server, past Quart's request machinery.

Every token of a streamed answer is one SSE event. Through Quart each event goes
through its response wrapper, timeout scope and send loop before hypercorn frames
it; on a CPU that llama.cpp keeps busy, that per-token work is taken from the
decode threads (profiled with py-spy: about a third of the runner's event-loop
time per token). `StreamingRoutes` answers `POST` requests with `"stream": true`
on the generation routes itself: it reads the body, calls the same answer
function the Quart route calls, and hands each event to hypercorn directly.
Everything else, non-streamed generations included, goes to the Quart app with
the body it has already read.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from dmr.sdk.runner import (
    BadRequest,
    Receive,
    Send,
    error_bytes,
    offer_for,
    read_body,
    replay,
    send_streamed,
    send_whole,
)

__all__ = ["StreamingRoutes"]

Answer = Callable[[dict[str, Any]], Awaitable[Any]]  # Response | AsyncIterator[bytes]

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_JSON_HEADERS = [(b"content-type", b"application/json")]


class StreamingRoutes:
    """ASGI: streamed answers of `routes` here, the rest to `app`."""

    def __init__(self, app: Any, routes: Mapping[str, Answer]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        answer = self.routes.get(scope.get("path", ""))
        if scope["type"] != "http" or scope.get("method") != "POST" or answer is None:
            await self.app(scope, receive, send)
            return
        raw = await read_body(receive)
        if raw is None:
            return  # the client left before sending its request
        body = _streamed_body(raw)
        if body is None:  # not a streamed generation (or not JSON): Quart answers it
            await self.app(scope, replay(raw, receive), send)
            return
        try:
            chunks = await answer(body)
        except BadRequest as error:
            message = error_bytes(error.message, param=error.param)
            await send_whole(send, 400, message, _JSON_HEADERS)
            return
        # A client that leaves closes the generator, whose `finally` frees the slot.
        await send_streamed(chunks, receive, send, 200, _SSE_HEADERS, direct=offer_for(scope))


def _streamed_body(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) and body.get("stream") else None
