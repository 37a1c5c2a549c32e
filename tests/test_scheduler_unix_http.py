"""The proxy's small HTTP/1.1 client: the three ways a body can end, and breakage."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from dmr.scheduler.unix_http import RunnerConnectionError, open_request


@asynccontextmanager
async def unix_server(answer: bytes, *, close: bool = True) -> AsyncIterator[Path]:
    """A server that reads one request head and writes `answer` verbatim."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if close:
            writer.close()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.sock"
        server = await asyncio.start_unix_server(handle, str(path))
        async with server:
            yield path


async def fetch(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    async with unix_server(answer) as path:
        response = await open_request(path, "POST", "/x", b"{}", {"Content-Type": "a/b"})
        try:
            return response.status, response.headers, await response.read()
        finally:
            await response.aclose()


async def test_content_length_body() -> None:
    status, headers, body = await fetch(
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert (status, headers["content-type"], body) == (201, "application/json", b"{}")


async def test_chunked_body_loses_its_framing() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    )
    assert (await fetch(answer))[2] == b"hello world"


async def test_body_until_the_connection_closes() -> None:
    assert (await fetch(b"HTTP/1.0 200 OK\r\n\r\nall of it"))[2] == b"all of it"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nContent-",
        b"garbage\r\n\r\n",
        b"",
    ],
)
async def test_broken_answers_raise_runner_connection_error(answer: bytes) -> None:
    with pytest.raises(RunnerConnectionError):
        await fetch(answer)


async def test_missing_socket_is_a_runner_connection_error() -> None:
    with pytest.raises(RunnerConnectionError):
        await open_request(Path("/nonexistent/x.sock"), "GET", "/", b"", {})
