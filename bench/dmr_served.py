"""`dmr serve` for a bench: a temporary store, a free port, healthy before use, stopped
after. Shared by the benches that measure the server as a user runs it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from dmr.testing import free_port, stop_process

__all__ = ["dmr_served"]


@contextlib.asynccontextmanager
async def dmr_served(folder: Path, **env: str) -> AsyncIterator[str]:
    """The base URL of a `dmr serve` on `folder/models`, logging to `folder/server.log`,
    with `env` added to its environment."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    environment = dict(
        os.environ,
        MODELS_PATH=str(folder / "models"),
        MODEL_RUNNER_PORT=str(port),
        MODEL_RUNNER_HOST=base,
        MODEL_RUNNER_LOG_DIR=str(folder / "logs"),
        **env,
    )
    with (folder / "server.log").open("wb") as log:
        server = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "dmr", "serve"], env=environment, stdout=log, stderr=log
        )
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if (await http.get("/")).status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                await asyncio.sleep(0.2)
        yield base
    finally:
        stop_process(server, grace=30)
