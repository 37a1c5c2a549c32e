"""Direct streams (core/dmr/direct_streams.py): the server hands a client's socket to
the runner after the first chunk, the runner writes the rest to it in HTTP/1.1's
chunked framing, and tells the server what it wrote. Real sockets throughout: a TCP
connection on 127.0.0.1 stands for the client's, and a real drop box for the
runner's."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from dmr.asgi_streams import send_streamed
from dmr.direct_streams import (
    SUMMARY_HEAD_BYTES,
    SUMMARY_TAIL_BYTES,
    DropBox,
    hand_over,
    read_summary,
)
from dmr.server import client_connections
from hypercorn.asyncio import serve
from hypercorn.config import Config

HEADERS = [(b"content-type", b"text/event-stream")]


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the server's end, the client's end) of a TCP connection on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        served, _ = listener.accept()
    served.setblocking(False)  # as asyncio keeps it
    client.settimeout(10)
    yield served, client
    served.close()
    client.close()


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = sock.recv(size - len(data))
        assert piece, f"the connection closed after {data!r}"
        data += piece
    return data


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def test_a_handed_socket_carries_chunks_and_the_connection_outlives_the_runner(
    tmp_path: Path, connection: tuple[socket.socket, socket.socket]
) -> None:
    served, client = connection
    box = DropBox(tmp_path / "runner.sock.direct")
    try:
        offer = box.offer("t1")
        assert await hand_over(str(box.path), "t1", served.fileno())
        writer = await offer.accept(wait_s=5)
        assert writer is not None
        assert await writer.write(b"data: 1\n\n")
        assert read_exactly(client, 14) == b"9\r\ndata: 1\n\n\r\n"
        writer.close()  # the runner lets go of its copy...
        served.sendall(b"0\r\n\r\n")  # ...and the server's still ends the answer
        assert read_exactly(client, 5) == b"0\r\n\r\n"
    finally:
        box.close()


async def test_a_refusal_leaves_the_stream_with_the_server(tmp_path: Path) -> None:
    box = DropBox(tmp_path / "runner.sock.direct")
    try:
        offer = box.offer("t2")
        assert await hand_over(str(box.path), "t2", None)
        assert await offer.accept(wait_s=5) is None
    finally:
        box.close()


async def test_a_socket_nobody_waits_for_is_closed(
    tmp_path: Path, connection: tuple[socket.socket, socket.socket]
) -> None:
    served, _ = connection
    box = DropBox(tmp_path / "runner.sock.direct")
    try:
        before = open_fds()
        offer = box.offer("t3")
        offer.withdraw()  # the answer ended before the server answered
        assert await hand_over(str(box.path), "t3", served.fileno())
        assert await hand_over(str(box.path), "unknown", served.fileno())
        await asyncio.sleep(0.1)  # the drop box reads them
        assert open_fds() == before
    finally:
        box.close()


async def test_send_streamed_writes_after_the_first_chunk_and_reports_what_it_wrote(
    tmp_path: Path, connection: tuple[socket.socket, socket.socket]
) -> None:
    """The first chunk and the summary go over HTTP (`send`), the rest to the socket."""
    served, client = connection
    box = DropBox(tmp_path / "runner.sock.direct")
    sent: list[dict[str, Any]] = []
    handed = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message.get("body") == b"data: first\n\n":  # what the server does then
            asyncio.get_running_loop().create_task(
                hand_over(str(box.path), "t4", served.fileno())
            ).add_done_callback(lambda _: handed.set())

    rest = [b"data: %d\n\n" % n for n in range(50)]

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: first\n\n"
        for chunk in rest:
            yield chunk

    try:
        await send_streamed(chunks(), never_disconnects, send, 200, HEADERS, box.offer("t4"))
    finally:
        box.close()
    await handed.wait()
    assert sent[0]["type"] == "http.response.start"
    assert (b"x-dmr-direct", os.fsencode(box.path)) in sent[0]["headers"]
    bodies = [message["body"] for message in sent[1:]]
    assert bodies[0] == b"data: first\n\n" and bodies[-1] == b""
    summary = read_summary(bodies[1])
    assert summary is not None and len(bodies) == 3
    assert summary.head == b"".join(rest) and summary.tail == b"" and not summary.cut
    framed = b"".join(b"%x\r\n%b\r\n" % (len(chunk), chunk) for chunk in rest)
    assert read_exactly(client, len(framed)) == framed


async def test_without_the_socket_the_whole_stream_goes_over_http(tmp_path: Path) -> None:
    box = DropBox(tmp_path / "runner.sock.direct")
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message["body"])
            if len(sent) == 1:
                await hand_over(str(box.path), "t5", None)  # declined

    async def chunks() -> AsyncIterator[bytes]:
        for n in range(3):
            yield b"data: %d\n\n" % n

    try:
        await send_streamed(chunks(), never_disconnects, send, 200, HEADERS, box.offer("t5"))
    finally:
        box.close()
    assert sent == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]


async def test_a_client_gone_stops_the_generation_and_the_answer_still_ends(
    tmp_path: Path, connection: tuple[socket.socket, socket.socket]
) -> None:
    served, client = connection
    box = DropBox(tmp_path / "runner.sock.direct")
    sent: list[dict[str, Any]] = []
    closed = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message.get("body") == b"data: first\n\n":
            await hand_over(str(box.path), "t6", served.fileno())
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # a reset, at once

    async def endless() -> AsyncIterator[bytes]:
        try:
            yield b"data: first\n\n"
            while True:
                await asyncio.sleep(0.01)
                yield b"data: more\n\n"
        finally:
            closed.set()

    try:
        await asyncio.wait_for(
            send_streamed(endless(), never_disconnects, send, 200, HEADERS, box.offer("t6")), 10
        )
    finally:
        box.close()
    assert closed.is_set()  # the generator's `finally` frees the runner's slot
    assert read_summary(sent[-2]["body"]) is not None
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_the_summary_keeps_the_head_and_the_tail_of_a_long_stream() -> None:
    from dmr.direct_streams import DirectWriter

    writer = DirectWriter(socket.socket())
    data = bytes(range(256)) * ((SUMMARY_HEAD_BYTES + 3 * SUMMARY_TAIL_BYTES) // 256 + 1)
    for start in range(0, len(data), 1000):
        writer.keep(data[start : start + 1000])
    writer.client.close()
    summary = read_summary(writer.summary())
    assert summary is not None and summary.cut
    assert summary.head == data[:SUMMARY_HEAD_BYTES]
    assert summary.tail == data[-SUMMARY_TAIL_BYTES:]
    assert read_summary(b"data: {}\n\n") is None


async def test_hypercorn_connections_are_found_from_the_request_scope() -> None:
    """The only hook into hypercorn (client_connections.install) works with the
    installed version: a request on plain TCP finds its connection's transport."""
    assert client_connections.install()
    found: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        transport = client_connections.transport_for(scope)
        found.append(transport is not None and transport.get_extra_info("socket") is not None)
        body = b"ok"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))
    try:
        for _ in range(100):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        stop.set()
        await serving
    assert found == [True]


class UnreadTransport:
    """A client's transport with bytes it has not taken yet (a slow reader)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 1


async def test_the_server_declines_while_the_client_has_bytes_left_to_take(
    tmp_path: Path, connection: tuple[socket.socket, socket.socket]
) -> None:
    """Else the runner's chunks could reach the client before the server's last ones."""
    from dmr.server.proxy_routes import _handing_over

    served, _ = connection
    box = DropBox(tmp_path / "runner.sock.direct")
    noted: list[bool] = []

    async def relayed() -> AsyncIterator[bytes]:
        yield b"data: first\n\n"
        yield b"data: second\n\n"

    try:
        offer = box.offer("t7")
        chunks = _handing_over(
            relayed(),
            (str(box.path), "t7"),
            UnreadTransport(served),
            noted.append,  # type: ignore[arg-type]
        )
        assert [chunk async for chunk in chunks] == [b"data: first\n\n", b"data: second\n\n"]
        assert await offer.accept(wait_s=5) is None
        assert noted == [False]
    finally:
        box.close()
