"""A minimal HTTP/1.1 client over a runner's unix socket (or TCP, for a runner on a
cluster node), for the proxy's hot path.

httpx costs about 60 µs of CPU per streamed chunk; this costs about 15. On a
CPU-bound machine the proxy's CPU is taken from the runner's generation, so
for the byte-forwarding path (no redirects, no auth, no pooling: one
connection per request, which on a unix socket costs well under a
millisecond) this small reader is worth having. Everything else talks to
runners with `RunnerHandle.client` (httpx).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RunnerConnectionError", "UnixResponse", "open_request"]

_MAX_HEADER_LINES = 200


class RunnerConnectionError(ConnectionError):
    """The runner closed, reset or garbled the connection."""


@dataclass(eq=False)  # compared and hashed by identity: kept in weak sets
class UnixResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    _reader: asyncio.StreamReader = field(repr=False)
    _writer: asyncio.StreamWriter = field(repr=False)
    _consumed: bool = False

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, with HTTP's chunked framing removed."""
        if self._consumed:
            return
        self._consumed = True
        try:
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                async for piece in self._chunked():
                    yield piece
            elif "content-length" in self.headers:
                remaining = int(self.headers["content-length"])
                while remaining > 0:
                    piece = await self._reader.read(min(remaining, 65536))
                    if not piece:
                        raise RunnerConnectionError("the runner closed the connection mid-body")
                    remaining -= len(piece)
                    yield piece
            else:  # delimited by the end of the connection
                while piece := await self._reader.read(65536):
                    yield piece
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as error:
            if isinstance(error, RunnerConnectionError):
                raise
            raise RunnerConnectionError(f"the runner connection broke: {error!r}") from error

    async def _chunked(self) -> AsyncIterator[bytes]:
        reader = self._reader
        while True:
            line = await reader.readline()
            if not line:
                raise RunnerConnectionError("the runner closed the connection mid-stream")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.iter_body()])

    def abort(self) -> None:
        """Drop the connection now: its reader fails at once with `RunnerConnectionError`
        (a runner on a lost node may never close it)."""
        self._writer.transport.abort()

    async def aclose(self) -> None:
        """Close the connection; a runner sees this as the client going away."""
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


async def open_request(
    address: Path | tuple[str, int],
    method: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
) -> UnixResponse:
    """Send one request and read the status line and headers of the answer. `address`
    is the runner's unix socket, or (host, port) for a runner on a cluster node."""
    try:
        if isinstance(address, tuple):
            reader, writer = await asyncio.open_connection(*address, limit=1 << 20)
        else:
            reader, writer = await asyncio.open_unix_connection(str(address), limit=1 << 20)
    except OSError as error:
        raise RunnerConnectionError(f"cannot connect to the runner: {error}") from error
    try:
        head = [f"{method} {path} HTTP/1.1", "Host: runner", f"Content-Length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise RunnerConnectionError(f"the runner answered {status_line[:80]!r}")
        status = int(parts[1])
        answer_headers: dict[str, str] = {}
        for _ in range(_MAX_HEADER_LINES):
            line = await reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise RunnerConnectionError("the runner closed the connection in the headers")
            name, _, value = line.decode("latin-1").partition(":")
            key = name.strip().lower()
            value = value.strip()
            answer_headers[key] = (
                f"{answer_headers[key]}, {value}" if key in answer_headers else value
            )
        else:
            raise RunnerConnectionError("the runner sent too many headers")
    except BaseException as error:
        writer.close()
        if isinstance(error, (OSError, ValueError, asyncio.IncompleteReadError)) and not isinstance(
            error, RunnerConnectionError
        ):
            raise RunnerConnectionError(f"the runner connection broke: {error!r}") from error
        raise
    return UnixResponse(status=status, headers=answer_headers, _reader=reader, _writer=writer)
