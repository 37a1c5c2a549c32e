"""The client the CLI uses to reach `dmr serve`, which it starts first when none answers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from dmr.cli.autostart import ServerUnavailableError, client_address, ensure_server
from dmr.cli.http import ServerClient

if TYPE_CHECKING:
    import ssl

__all__ = ["ServerUnavailableError", "auth_headers", "connect", "server_url", "ssl_context"]


def server_url() -> tuple[str, Path | None]:
    """(base URL, unix socket or None): `MODEL_RUNNER_HOST`; else where `dmr serve` in
    this environment listens: `http://127.0.0.1:12434` by default (`MODEL_RUNNER_PORT`),
    the socket of a server on `MODEL_RUNNER_SOCK` alone."""
    address = client_address()
    return address.base_url, address.socket_path


def auth_headers() -> dict[str, str]:
    """`Authorization: Bearer $DMR_API_KEY` when the server requires a key."""
    api_key = os.environ.get("DMR_API_KEY")
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def connect(timeout: float | None = 30.0, *, autostart: bool = True) -> ServerClient:
    """A client for the server.

    With `autostart`, first make sure one answers: a connect probe (about a
    millisecond), and `dmr serve` started in the background when nothing answers
    (dmr.cli.autostart). When none may be started (`MODEL_RUNNER_HOST`,
    `DMR_NO_AUTOSTART`) this raises ServerUnavailableError, a TransportError saying
    why. Without `autostart` nothing is probed or started (`dmr version`, which only
    reports).
    """
    address = ensure_server().address if autostart else client_address()
    headers = auth_headers()
    socket_path = str(address.socket_path) if address.socket_path else None
    return ServerClient(
        address.base_url,
        socket_path=socket_path,
        timeout=timeout,
        headers=headers,
        ssl_context=ssl_context(address.ca_cert, address.skip_verify),
    )


def ssl_context(ca_cert: str, skip_verify: bool) -> ssl.SSLContext | None:
    """A named context's TLS settings (dmr.cli.contexts); None: the default checks."""
    if not ca_cert and not skip_verify:
        return None
    import ssl

    context = ssl.create_default_context(cafile=ca_cert or None)
    if skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
