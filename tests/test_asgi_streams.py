"""`send_streamed` (core/dmr/asgi_streams.py) sends a stream's status and headers with
its first chunk, as llama-server does, not before it: a burst's eight early header
writes, relays and reads took the cores from its first decode step."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from dmr.asgi_streams import send_streamed

HEADERS = [(b"content-type", b"text/event-stream")]


async def never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def test_the_headers_go_out_with_the_first_chunk() -> None:
    sent: list[dict[str, Any]] = []
    first_ready = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def chunks() -> AsyncIterator[bytes]:
        await first_ready.wait()
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    streaming = asyncio.create_task(send_streamed(chunks(), never_disconnects, send, 200, HEADERS))
    await asyncio.sleep(0.05)
    assert sent == []  # nothing, not even the status, before the first chunk
    first_ready.set()
    await streaming
    assert [message["type"] for message in sent] == [
        "http.response.start",
        "http.response.body",
        "http.response.body",
        "http.response.body",
    ]
    assert sent[0]["status"] == 200 and sent[0]["headers"] == HEADERS
    assert [message["body"] for message in sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n", b""]


async def test_a_stream_that_fails_before_its_first_chunk_sends_nothing() -> None:
    """So the ASGI server answers a 500, where a 200 cut short was sent before."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def chunks() -> AsyncIterator[bytes]:
        raise RuntimeError("the generation failed")
        yield b""  # pragma: no cover  (makes this a generator)

    await send_streamed(chunks(), never_disconnects, send, 200, HEADERS)
    assert sent == []


async def test_an_empty_stream_still_answers() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def chunks() -> AsyncIterator[bytes]:
        return
        yield b""  # pragma: no cover

    await send_streamed(chunks(), never_disconnects, send, 200, HEADERS)
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
