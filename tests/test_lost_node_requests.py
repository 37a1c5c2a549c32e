"""Requests to a runner on a cluster node whose node stops answering (a frozen or
powered-off machine keeps its TCP connections open): when the runner is declared
lost, every request to it ends with an error, wherever it was. Found in CI: two
requests that the node's runner had queued without a byte of answer waited on past
the node's death, until their clients gave up minutes later.

The node is a stand-in named as such: a TCP server on 127.0.0.1 that takes a
request and never answers (or answers a stream's head and then nothing), which is
what the proxy sees of a SIGSTOPped node. `abort_streams` is what the scheduler
calls when Ray says the runner's node died (`Scheduler._watch`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from dmr.errors import RunnerError
from dmr.records import Mode
from dmr.scheduler.runner import RunnerHandle
from dmr.scheduler.unix_http import UnixResponse
from dmr.server.proxy import Exchange, open_exchange
from dmr.server.services import Services

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
    b'e\r\ndata: {"a":1}\n\n\r\n'
)


@dataclass
class FrozenNode:
    address: tuple[str, int]
    came: asyncio.Event  # a request arrived
    hung_up: asyncio.Event  # the proxy closed its connection


@asynccontextmanager
async def frozen_node(answer: bytes) -> AsyncIterator[FrozenNode]:
    """A stand-in node: reads one request, writes `answer`, then never another byte
    and never closes; it notes when the other side closes."""
    came, hung_up = asyncio.Event(), asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        held.append(writer)
        writer.write(answer)
        await writer.drain()
        came.set()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # the body, then nothing until the proxy closes
        hung_up.set()
        await asyncio.Event().wait()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield FrozenNode(("127.0.0.1", port), came, hung_up)
    finally:
        for writer in held:
            writer.transport.abort()


class OneRunner:
    """A stand-in scheduler that leases one handle and counts what was given back."""

    def __init__(self, handle: RunnerHandle) -> None:
        self.handle = handle
        self.released = 0

    @asynccontextmanager
    async def _lease(self) -> AsyncIterator[RunnerHandle]:
        try:
            yield self.handle
        finally:
            self.released += 1

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        return self._lease()


def node_runner(address: tuple[str, int]) -> RunnerHandle:
    return RunnerHandle(
        model_id="sha256:stand-in",
        model_name="stand-in",
        backend="llama.cpp",
        mode=Mode.COMPLETION,
        socket_path=Path("/nonexistent/stand-in.sock"),
        client=httpx.AsyncClient(),
        tcp_address=address,
    )


def opening(scheduler: OneRunner) -> asyncio.Task[Exchange]:
    services = cast(Services, SimpleNamespace(scheduler=scheduler))
    return asyncio.create_task(
        open_exchange(
            services, model="stand-in", mode="completion", path="/v1/chat/completions", body=b"{}"
        )
    )


async def ends_soon(task: asyncio.Task[Any] | Any, within: float = 5.0) -> Any:
    return await asyncio.wait_for(task, within)


async def test_a_request_queued_without_an_answer_ends_when_its_runner_is_lost() -> None:
    async with frozen_node(b"") as node:
        scheduler = OneRunner(node_runner(node.address))
        task = opening(scheduler)
        await ends_soon(node.came.wait())
        await asyncio.sleep(0.1)
        assert not task.done()  # the runner holds it, as a queued request
        scheduler.handle.abort_streams()
        with pytest.raises(RunnerError, match="stand-in"):
            await ends_soon(task)
        assert scheduler.released == 1


async def test_a_stream_whose_head_came_ends_with_an_error_event_when_its_runner_is_lost() -> None:
    async with frozen_node(STREAM_HEAD) as node:
        scheduler = OneRunner(node_runner(node.address))
        exchange = await ends_soon(opening(scheduler))
        assert exchange.chunks is not None
        chunks = aiter(exchange.chunks)
        assert b"data:" in await ends_soon(anext(chunks))
        reading = asyncio.ensure_future(anext(chunks))
        await asyncio.sleep(0.1)
        scheduler.handle.abort_streams()
        assert b"error" in await ends_soon(reading)
        with pytest.raises(StopAsyncIteration):
            await ends_soon(anext(chunks))
        assert scheduler.released == 1


async def test_a_request_sent_after_its_runner_was_lost_is_refused_at_once() -> None:
    """The scheduler may hand out a runner in the instant before it learns it is lost;
    the node's kernel still accepts connections for a process that is stopped."""
    async with frozen_node(STREAM_HEAD) as node:
        scheduler = OneRunner(node_runner(node.address))
        scheduler.handle.abort_streams()
        with pytest.raises(RunnerError, match="stand-in"):
            await ends_soon(opening(scheduler), within=1.0)
        assert scheduler.released == 1
        assert not node.came.is_set()  # nothing was sent to it


async def test_a_client_that_leaves_while_its_request_is_queued_closes_the_connection() -> None:
    """The wait for a lost runner must not keep a request whose client left: the
    connection to the node closes (a live runner then drops the queued request) and
    the lease is given back."""
    async with frozen_node(b"") as node:
        scheduler = OneRunner(node_runner(node.address))
        task = opening(scheduler)
        await ends_soon(node.came.wait())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ends_soon(task)
        await ends_soon(node.hung_up.wait())
        assert scheduler.released == 1
        assert not scheduler.handle.lost_event.is_set()


async def test_an_answer_that_comes_as_its_client_leaves_is_not_left_open() -> None:
    """The head of the answer arrives in the same turn of the loop as the client's
    cancellation: nobody will read that connection, so it is dropped."""
    aborted: list[bool] = []

    class Opened:
        def abort(self) -> None:
            aborted.append(True)

    head_came = asyncio.Event()

    async def opening() -> UnixResponse:
        await head_came.wait()
        return cast(UnixResponse, Opened())

    handle = node_runner(("127.0.0.1", 9))
    task = asyncio.create_task(handle.unless_lost(opening()))
    await asyncio.sleep(0.01)  # the task waits for the opening
    head_came.set()  # the opening completes in the next turn of the loop...
    task.cancel()  # ...and the caller is cancelled in the same turn
    with pytest.raises(asyncio.CancelledError):
        await task
    assert aborted == [True]
