"""Raw ASGI pieces for answers sent past a web framework: the server's proxy routes
and the llama.cpp runner's streamed generations use them.

Light on purpose (asyncio only): runners import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from dmr.direct_streams import DirectOffer, DirectWriter

__all__ = [
    "Receive",
    "Send",
    "read_body",
    "replay",
    "send_streamed",
    "send_whole",
    "unless_disconnected",
]

log = logging.getLogger(__name__)

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
T = TypeVar("T")


async def read_body(receive: Receive) -> bytes | None:
    """The request's whole body; None when the client left before sending it."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def replay(raw: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body read already, then the real one's messages."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> T | None:
    """`work`'s result, or None when the client leaves first: `work` is then cancelled,
    so that what it waits on (a runner generating a whole answer, a place in the
    scheduler's queue) stops at once instead of running on for nobody. Called
    once the request's body has been read: the next message is the disconnect.

    A client that left in the same loop pass as `work` finished also gets None, and
    the result is closed (its `aclose`): hypercorn sends `http.disconnect` once, so a
    caller given the result would stream it to nobody until the last token."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    gone = False
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        gone = watcher.done() and not watcher.cancelled() and watcher.exception() is None
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return None
    if gone:
        if task.exception() is None:
            await _close(task.result())
        return None
    return task.result()


async def _close(result: object) -> None:
    aclose = getattr(result, "aclose", None)
    if aclose is not None:
        await aclose()


async def send_whole(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    head = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_streamed(
    chunks: AsyncIterable[bytes],
    receive: Receive,
    send: Send,
    status: int,
    headers: list[tuple[bytes, bytes]],
    direct: DirectOffer | None = None,
) -> None:
    """Send `chunks` as they come, the status and headers with the first one. A client
    that leaves cancels the sending, and the generator is closed either way: its
    `finally` frees what the answer held (a runner's slot, the server's lease on a
    runner).

    The headers wait for the first chunk, as llama-server's do: sent at once, each of a
    burst of streams cost a write here, a relay in `dmr serve` and a read in the client
    while the burst's first decode step ran on the same cores, and that step took
    twice as long (docs/benchmarks.md). A generator that fails before its first chunk
    then ends in a 500 from the ASGI server, not in a 200 cut short.

    With a `direct` offer (a runner's answer to a server that asked for a direct
    stream, dmr/direct_streams.py) the chunks after the first go straight to the
    client's socket once the server hands it over; `chunks` with a `go_direct(writer)`
    method are given the writer, to write to it from elsewhere (the llama.cpp
    runner's decode thread), and may hold their last chunk back as `final_chunk`,
    which then goes through the server after the summary."""
    if direct is not None:
        headers = [*headers, direct.header]
    start = {"type": "http.response.start", "status": status, "headers": headers}

    async def produce() -> None:
        started = False
        offer: DirectOffer | None = direct
        writer: DirectWriter | None = None
        try:
            async for chunk in chunks:
                if writer is not None:
                    if not await writer.write(chunk):
                        break  # the client left: the generator is closed below
                    continue
                if not started:
                    await send(start)
                    started = True
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if offer is not None:  # asked once, after the first chunk
                    writer = await offer.accept()
                    offer = None
                    go_direct = getattr(chunks, "go_direct", None)
                    if writer is not None and go_direct is not None:
                        go_direct(writer)  # the chunks' producer may write itself
            if not started:
                await send(start)
            if writer is not None:
                summary = writer.summary()
                await send({"type": "http.response.body", "body": summary, "more_body": True})
                # The stream's end, held back by its producer, goes through the server
                # after the summary: the server has then read all of the answer before
                # the client, seeing `[DONE]`, may leave.
                final = getattr(chunks, "final_chunk", None)
                if final:
                    await send({"type": "http.response.body", "body": final, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if writer is not None:
                writer.close()
            if direct is not None:
                direct.withdraw()  # a socket that comes after this is closed

    producer = asyncio.ensure_future(produce())
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (producer, watcher):
            task.cancel()
        for task in (producer, watcher):
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await task
                except Exception:  # a failed stream ends; the ASGI server closes the connection
                    log.exception("streamed answer failed")
        if direct is not None:
            direct.withdraw()  # also when the producer was cancelled before it began
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
