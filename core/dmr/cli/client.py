"""The HTTP client the CLI uses to reach a running `dmr serve`."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from dmr.settings import DEFAULT_PORT, Settings

__all__ = ["ServerUnavailableError", "connect", "server_url"]


class ServerUnavailableError(RuntimeError):
    pass


def server_url() -> tuple[str, Path | None]:
    """(base URL, unix socket or None): `MODEL_RUNNER_HOST`, else the default socket
    when a server listens there, else `http://127.0.0.1:12434`."""
    host = os.environ.get("MODEL_RUNNER_HOST")
    if host:
        if host.startswith("unix://"):
            return "http://dmr", Path(host.removeprefix("unix://"))
        if "://" not in host:
            host = f"http://{host}"
        return host.rstrip("/"), None
    socket_path = Settings.from_env().socket_path
    if socket_path.exists():
        return "http://dmr", socket_path
    port = os.environ.get("MODEL_RUNNER_PORT") or str(DEFAULT_PORT)
    return f"http://127.0.0.1:{port}", None


def connect(timeout: float | None = 30.0) -> httpx.Client:
    base_url, socket_path = server_url()
    transport = httpx.HTTPTransport(uds=str(socket_path)) if socket_path else None
    headers = {}
    api_key = os.environ.get("DMR_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return httpx.Client(
        base_url=base_url,
        transport=transport,
        timeout=httpx.Timeout(timeout, connect=5.0),
        headers=headers,
    )
