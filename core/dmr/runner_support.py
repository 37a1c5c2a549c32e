"""Helpers for runner subprocesses written in Python (engine plugins' workers).

Runners import this module, never the server's modules: it needs only asyncio
and hypercorn.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

__all__ = ["serve_runner", "stop_when_orphaned"]


async def stop_when_orphaned(stop: asyncio.Event, interval: float = 1.0) -> None:
    """Set `stop` when the server that started this runner is gone.

    A server killed with SIGKILL cannot stop its runners; they are re-parented and
    would hold their model's memory forever. The parent's PID changing says so.
    """
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(interval)
        if os.getppid() != parent:
            stop.set()


async def serve_runner(
    app: Any, socket_path: Path, load: Callable[[Callable[[], None]], None]
) -> None:
    """Serve `app` on `socket_path` while `load(fail)` loads the model in a thread.

    /health can answer 503 during the load. Serving stops on SIGTERM or SIGINT,
    when the parent server is gone, or when `load` calls `fail()` (a load error,
    which the runner then reports on stderr and by its exit status).
    """
    socket_path.unlink(missing_ok=True)  # noqa: ASYNC240  (before serving)
    config = Config()
    config.bind = [f"unix:{socket_path}"]
    config.accesslog = None
    config.errorlog = "-"
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 300.0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    orphan_watch = loop.create_task(stop_when_orphaned(stop))

    def fail() -> None:
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=load, args=(fail,), daemon=True).start()
    try:
        await serve(app, config, shutdown_trigger=stop.wait)
    finally:
        orphan_watch.cancel()
        socket_path.unlink(missing_ok=True)  # noqa: ASYNC240
