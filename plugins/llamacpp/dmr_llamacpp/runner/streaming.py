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

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from dmr.runner_support import BadRequest, error_bytes

__all__ = ["StreamingRoutes"]

log = logging.getLogger(__name__)

Answer = Callable[[dict[str, Any]], Awaitable[Any]]  # Response | AsyncIterator[bytes]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


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
        raw = await _read_body(receive)
        if raw is None:
            return  # the client left before sending its request
        body = _streamed_body(raw)
        if body is None:  # not a streamed generation (or not JSON): Quart answers it
            await self.app(scope, _replay(raw, receive), send)
            return
        try:
            chunks = await answer(body)
        except BadRequest as error:
            await _send_whole(send, 400, error_bytes(error.message, param=error.param))
            return
        await _stream(chunks, receive, send)


def _streamed_body(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) and body.get("stream") else None


async def _read_body(receive: Receive) -> bytes | None:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(raw: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body read already, then the real one's messages."""
    given = False

    async def replayed() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed


async def _send_whole(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _stream(chunks: AsyncIterator[bytes], receive: Receive, send: Send) -> None:
    """Send the events as they come; a client that leaves cancels the generator, whose
    `finally` frees the request's slot."""

    async def produce() -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def until_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    producer = asyncio.ensure_future(produce())
    watcher = asyncio.ensure_future(until_disconnect())
    try:
        await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (producer, watcher):
            task.cancel()
        for task in (producer, watcher):
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await task
                except Exception:  # a failed stream ends; hypercorn closes the connection
                    log.exception("streamed answer failed")
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
