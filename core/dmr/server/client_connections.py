"""The transport under each plain-TCP client connection hypercorn serves, found from a
request's ASGI scope: a direct stream (dmr/direct_streams.py) hands its socket to a
runner.

ASGI gives an app no way to reach the connection under a request. hypercorn's
asyncio worker serves each connection with a `TCPServer` it looks up in its `run`
module; `install` puts a subclass there that files the connection's transport
under the (client, server) addresses that hypercorn writes into each request's
scope, for as long as it serves the connection. TLS connections are not filed (a
runner cannot write into a TLS session), nor unix-socket ones (their scope has no
client address to tell them apart). Where hypercorn no longer has that module
global, nothing is filed and every stream is relayed as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["install", "transport_for"]

log = logging.getLogger(__name__)

# (client address, server address), as hypercorn writes them into the scope.
_live: dict[tuple[Any, ...], asyncio.Transport] = {}


def install() -> bool:
    """File every plain-TCP connection hypercorn's asyncio worker serves from now on;
    False when this hypercorn has no place for it."""
    try:
        from hypercorn.asyncio import run as hypercorn_run
        from hypercorn.utils import parse_socket_addr
    except ImportError:
        return False
    base = getattr(hypercorn_run, "TCPServer", None)
    if base is None or not hasattr(base, "run"):
        log.warning("this hypercorn serves connections otherwise: no direct streams")
        return False
    if getattr(base, "files_connections", False):
        return True

    class FilingTCPServer(base):  # type: ignore[misc,valid-type]
        files_connections = True

        async def run(self) -> None:
            key: tuple[Any, ...] | None = None
            writer = getattr(self, "writer", None)
            transport = getattr(writer, "transport", None)
            if writer is not None and writer.get_extra_info("ssl_object") is None:
                sock = writer.get_extra_info("socket")
                try:
                    client = parse_socket_addr(sock.family, sock.getpeername())
                    server = parse_socket_addr(sock.family, sock.getsockname())
                except (AttributeError, OSError):
                    client = server = None
                if client is not None and server is not None and transport is not None:
                    key = (tuple(client), tuple(server))
                    _live[key] = transport
            try:
                await super().run()
            finally:
                if key is not None and _live.get(key) is transport:
                    del _live[key]

    setattr(hypercorn_run, "TCPServer", FilingTCPServer)  # noqa: B010  (see the docstring)
    return True


def transport_for(scope: Mapping[str, Any]) -> asyncio.Transport | None:
    """The transport of the connection `scope`'s request came on, when it can be handed
    over: plain HTTP/1.1 on TCP, filed by `install`."""
    if scope.get("scheme") != "http" or scope.get("http_version") != "1.1":
        return None
    client, server = scope.get("client"), scope.get("server")
    if not client or not server:
        return None
    transport = _live.get((tuple(client), tuple(server)))
    if transport is None or transport.is_closing():
        return None
    return transport
