"""`send_streamed` (core/dmr/asgi_streams.py) sends a stream's status and headers with
its first chunk, as llama-server does, not before it: a burst's eight early header
writes, relays and reads took the cores from its first decode step."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from dmr.asgi_streams import send_streamed, unless_disconnected

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


async def test_a_client_gone_as_the_work_finishes_is_not_lost() -> None:
    """The disconnect and `work`'s result in one loop pass: hypercorn sends the
    disconnect once, so a result handed on would be streamed to nobody to its end.
    None, and the result closed (its runner connection and lease given back)."""

    class Exchange:
        closed = False

        async def aclose(self) -> None:
            self.closed = True

    exchange = Exchange()
    left: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def receive() -> dict[str, Any]:
        return await left

    async def work() -> Exchange:
        await asyncio.sleep(0)
        left.set_result({"type": "http.disconnect"})  # the client leaves as work ends
        return exchange

    assert await unless_disconnected(work(), receive) is None
    assert exchange.closed


async def test_work_that_finishes_first_is_handed_on() -> None:
    async def work() -> str:
        return "answer"

    assert await unless_disconnected(work(), never_disconnects) == "answer"
