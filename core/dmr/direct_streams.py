"""Streamed answers that a runner writes straight to the client's connection.

Relayed through `dmr serve`, every token of a streamed answer cost a read and a
write in a second Python process (about 0.3-0.45 ms of CPU a token, profiled in
docs/benchmarks.md), and on a CPU that llama.cpp keeps busy that time is taken
from the decode. With a direct stream the server hands the client's socket to
the runner once the answer has begun, and touches nothing more until it ends.

The hand-over, for one streamed request (docs/architecture.md, "Direct streams"):

1. The server asks for it with the request header `x-dmr-direct: <token>`.
2. A runner that can (`serve_runner` keeps a drop box for it: a unix datagram
   socket beside its own) names the drop box in the same header of its answer,
   and sends the first chunk over HTTP as usual.
3. The server writes the head and that chunk to the client through hypercorn.
   Once its transport has nothing left to write, it sends the drop box one
   datagram: the token, with the client's socket attached (SCM_RIGHTS) or, to
   decline (TLS, a slow client, a connection it cannot hand over), without.
4. With the socket, the runner writes the following chunks to it itself, in
   HTTP/1.1's chunked framing, and when the answer ends sends the server one last
   chunk over HTTP: `SUMMARY_MARK`, then a bounded copy of what it wrote (its
   head and tail, for the request log and the token metrics). Without, it goes
   on over HTTP.
5. The server ends the response through hypercorn (the zero-length chunk), so the
   connection serves its next request as usual.

A client that leaves is seen by both: the server's hypercorn reads the close and
drops the runner connection, and the runner's next write fails. Either stops the
generation. Light on purpose (asyncio and socket only): runners import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DIRECT_HEADER",
    "SUMMARY_MARK",
    "DirectOffer",
    "DirectWriter",
    "DropBox",
    "drop_box_path",
    "hand_over",
    "offer_for",
    "read_summary",
]

log = logging.getLogger(__name__)

DIRECT_HEADER = "x-dmr-direct"
# Starts the runner's last chunk of a direct stream. No SSE chunk starts with NUL.
SUMMARY_MARK = b"\x00dmr-direct-summary\n"
# What the summary keeps of a direct stream, as the request log keeps of a relayed
# one: it folds the head into the answer's text and reads usage and finish_reason
# from the tail.
SUMMARY_HEAD_BYTES = 512 * 1024
SUMMARY_TAIL_BYTES = 16 * 1024
# A runner that hears nothing from the server this long after its first chunk goes
# on over HTTP. The server always answers (a socket or a refusal): this only
# covers a datagram that could not be sent.
ACCEPT_TIMEOUT_S = 10.0
_TOKEN_BYTES = 64


# The ASGI scope key under which `serve_runner` gives its apps the runner's drop box.
SCOPE_KEY = "dmr.direct_drop_box"


def offer_for(scope: Mapping[str, Any]) -> DirectOffer | None:
    """The direct-stream offer for a request the server asked one for; None when it
    did not, or when this runner keeps no drop box."""
    box = scope.get(SCOPE_KEY)
    if not isinstance(box, DropBox):
        return None
    wanted = DIRECT_HEADER.encode()
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return box.offer(value.decode("latin-1"))
    return None


def drop_box_path(runner_socket: Path) -> Path:
    """Where a runner serving on `runner_socket` keeps its drop box."""
    return runner_socket.with_name(runner_socket.name + ".direct")


class DropBox:
    """A runner's end: a unix datagram socket on which the server drops client sockets,
    each with the token of the request it belongs to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._waiting: dict[bytes, asyncio.Future[socket.socket | None]] = {}
        self._loop = asyncio.get_running_loop()
        path.unlink(missing_ok=True)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._socket.bind(str(path))
        self._loop.add_reader(self._socket.fileno(), self._on_readable)

    def close(self) -> None:
        self._loop.remove_reader(self._socket.fileno())
        self._socket.close()
        self.path.unlink(missing_ok=True)
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_result(None)

    def offer(self, token: str) -> DirectOffer:
        """What a streamed answer asked for with `token` waits on."""
        waiter = self._loop.create_future()
        self._waiting[token.encode()] = waiter
        return DirectOffer(self, token.encode(), waiter)

    def _on_readable(self) -> None:
        while True:
            try:
                data, fds, _flags, _address = socket.recv_fds(self._socket, _TOKEN_BYTES, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("direct streams' drop box failed: %s", error)
                return
            waiter = self._waiting.pop(data, None)
            client = socket.socket(fileno=fds[0]) if fds else None
            if waiter is None or waiter.done():
                if client is not None:
                    client.close()  # its request is gone, or gave up waiting: not ours
                continue
            waiter.set_result(client)

    def _forget(self, token: bytes) -> None:
        self._waiting.pop(token, None)


@dataclass
class DirectOffer:
    """One streamed answer's chance of a direct stream (runner side)."""

    box: DropBox
    token: bytes
    _waiter: asyncio.Future[socket.socket | None]

    @property
    def header(self) -> tuple[bytes, bytes]:
        """The answer's header that tells the server where to hand the socket."""
        return DIRECT_HEADER.encode(), os.fsencode(self.box.path)

    async def accept(self, wait_s: float = ACCEPT_TIMEOUT_S) -> DirectWriter | None:
        """The client's connection once the server hands it over; None when it declines."""
        try:
            client = await asyncio.wait_for(asyncio.shield(self._waiter), wait_s)
        except TimeoutError:
            log.warning("no answer from the server about a direct stream: going on over HTTP")
            client = None
        finally:
            self.box._forget(self.token)
            if not self._waiter.done():
                self._waiter.cancel()
        return DirectWriter(client) if client is not None else None

    def withdraw(self) -> None:
        """The answer ended before asking: a socket that comes for it is closed."""
        self.box._forget(self.token)
        if not self._waiter.done():
            self._waiter.cancel()


@dataclass
class DirectWriter:
    """Writes a stream's chunks to the client's socket in HTTP/1.1 chunked framing,
    and keeps the head and tail of what it wrote for the summary. `send_now` may be
    called from another thread (a runner's decode thread); closing waits for it."""

    client: socket.socket
    head: bytearray = field(default_factory=bytearray)
    tail: bytearray = field(default_factory=bytearray)
    gone: bool = False  # the client closed its connection: stop generating
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.client.setblocking(False)  # as the server's copy already is

    @staticmethod
    def frame(chunk: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(chunk), chunk)

    async def write(self, chunk: bytes) -> bool:
        """Write `chunk`; False once the client is gone."""
        if not chunk or self.gone:
            return not self.gone
        if not await self.write_framed(self.frame(chunk)):
            return False
        self.keep(chunk)
        return True

    async def write_framed(self, framed: bytes) -> bool:
        """Write bytes framed already; False once the client is gone."""
        try:
            await asyncio.get_running_loop().sock_sendall(self.client, framed)
        except OSError:  # reset, broken pipe: the client left
            self.gone = True
            return False
        return True

    def send_now(self, framed: bytes) -> int:
        """Send what the socket takes at once, from any thread: the bytes sent (0 when
        its buffer is full), -1 once the client is gone or the writer closed."""
        with self.lock:
            if self.closed or self.gone:
                return -1
            try:
                return self.client.send(framed)
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError:
                self.gone = True
                return -1

    def keep(self, chunk: bytes) -> None:
        """Add `chunk` to what the summary keeps."""
        room = SUMMARY_HEAD_BYTES - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > 2 * SUMMARY_TAIL_BYTES:
                del self.tail[:-SUMMARY_TAIL_BYTES]

    def summary(self) -> bytes:
        """The last chunk the runner sends the server over HTTP."""
        tail = bytes(self.tail[-SUMMARY_TAIL_BYTES:])
        cut = len(self.tail) > SUMMARY_TAIL_BYTES
        return b"%b%d %d %d\n%b%b" % (
            SUMMARY_MARK,
            len(self.head),
            len(tail),
            cut,
            bytes(self.head),
            tail,
        )

    def close(self) -> None:
        """Let go of the runner's copy of the socket; the server's keeps the connection."""
        with self.lock:
            self.closed = True
            self.client.close()


@dataclass(frozen=True)
class Summary:
    """What a direct stream wrote, as the server reads it back."""

    head: bytes
    tail: bytes
    cut: bool  # bytes between head and tail were left out


def read_summary(chunk: bytes) -> Summary | None:
    """The summary a chunk from the runner carries; None for an ordinary chunk."""
    if not chunk.startswith(SUMMARY_MARK):
        return None
    line, _, rest = chunk[len(SUMMARY_MARK) :].partition(b"\n")
    try:
        head_size, tail_size, cut = (int(part) for part in line.split())
    except ValueError:
        return Summary(b"", b"", True)
    return Summary(rest[:head_size], rest[head_size : head_size + tail_size], bool(cut))


async def hand_over(box: str, token: str, client_fd: int | None) -> bool:
    """Server side: send the runner's drop box `token`, with the client's socket or
    (None) without. False when the datagram could not be sent."""
    loop = asyncio.get_running_loop()
    fds = [client_fd] if client_fd is not None else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        try:
            sender.connect(box)
            while True:
                try:
                    socket.send_fds(sender, [token.encode()], fds)
                    return True
                except BlockingIOError:  # the drop box's queue is full: wait for room
                    room: asyncio.Future[None] = loop.create_future()
                    loop.add_writer(sender.fileno(), _settle, room)
                    try:
                        await room
                    finally:
                        loop.remove_writer(sender.fileno())
        except OSError as error:
            log.warning("cannot hand a client connection to the runner at %s: %s", box, error)
            return False


def _settle(future: asyncio.Future[None]) -> None:
    with contextlib.suppress(asyncio.InvalidStateError):
        future.set_result(None)
