"""Large request bodies read with backpressure (`POST /models/load`).

Quart's connection copies every ASGI body message into the request's `Body` as soon
as hypercorn delivers it, whether or not the handler has read the previous ones.
A model tarball arrives from a local client faster than a disk takes it, so most
of a model could pile up in the server's memory, part of it staying there as
heap glibc does not give back. Here the receiving side waits while
`UPLOAD_BUFFER_BYTES` are unread; the ASGI queue behind it fills and hypercorn
stops reading the socket.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from quart.asgi import ASGIHTTPConnection
from quart.wrappers.request import Body

if TYPE_CHECKING:
    from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent
    from quart.wrappers import Request

__all__ = ["UPLOAD_BUFFER_BYTES", "BackpressureHTTPConnection", "BoundedBody"]

# One of the store's 1 MiB write chunks. Loading a 98 MB model with its disk writes
# slowed to 100 MB/s raised peak RSS by 5 MB (4 MiB: 17 MB, unbounded: 165 MB),
# and larger chunks leave more heap glibc keeps after the upload; a local upload
# was no slower than with larger buffers.
UPLOAD_BUFFER_BYTES = 1 << 20


class BoundedBody(Body):
    """A request body the receiver stops filling at `UPLOAD_BUFFER_BYTES` unread.

    Meant to be iterated (`async for chunk in request.body`): awaiting it whole
    would wait forever once the buffer is full.
    """

    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        super().__init__(expected_content_length, max_content_length)
        self._room = asyncio.Event()
        self._room.set()

    def append(self, data: bytes) -> None:
        super().append(data)
        if len(self._data) >= UPLOAD_BUFFER_BYTES:
            self._room.clear()

    async def __anext__(self) -> bytes:
        try:
            return await super().__anext__()
        finally:
            self._room.set()

    async def wait_for_room(self) -> None:
        await self._room.wait()


class BackpressureHTTPConnection(ASGIHTTPConnection):
    """Quart's HTTP connection, receiving a `BoundedBody` only as fast as it is read."""

    async def handle_messages(self, request: Request, receive: ASGIReceiveCallable) -> None:
        body = request.body
        if not isinstance(body, BoundedBody):
            await super().handle_messages(request, receive)
            return

        async def receive_when_read() -> ASGIReceiveEvent:
            await body.wait_for_room()
            return await receive()

        await super().handle_messages(request, receive_when_read)
