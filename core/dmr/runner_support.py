"""Helpers for runner subprocesses written in Python (engine plugins' workers).

Runners import this module, never the server's modules: it needs only asyncio,
hypercorn and Quart. It holds what every runner needs: serving on its socket,
refusing a bad request (`BadRequest`) and answering in OpenAI's shapes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Response

from dmr.direct_streams import SCOPE_KEY as DIRECT_SCOPE_KEY
from dmr.direct_streams import DropBox, drop_box_path
from dmr.error_bodies import openai_error

__all__ = [
    "BATCH_PRIORITY",
    "LONE_HEADER",
    "LONE_VALUE",
    "PRIORITY_HEADER",
    "BadRequest",
    "error_bytes",
    "error_response",
    "json_response",
    "serve_runner",
    "stop_when_orphaned",
]


# The server marks a request to a runner as batch work (a Batch API line) with this
# header; a runner that can tell priorities apart serves interactive requests first
# (docs/batch.md, "Interactive first"). Absent: interactive.
PRIORITY_HEADER = "x-dmr-priority"
BATCH_PRIORITY = "batch"

# The server marks a request that reached it alone, with no other just before it or
# after it until it was forwarded (dmr/server/arrivals.py); a runner that waits for the
# rest of a burst before its first step need not wait for this one. Absent: it may be
# part of a burst.
LONE_HEADER = "x-dmr-lone"
LONE_VALUE = "1"


class BadRequest(ValueError):
    """A request the runner refuses with a 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def error_bytes(message: str, status: int = 400, *, param: str | None = None) -> bytes:
    """OpenAI's error body, encoded, as a runner answers every failed request."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps(openai_error(message, kind, param=param)).encode()


def error_response(message: str, status: int = 400, *, param: str | None = None) -> Response:
    body = error_bytes(message, status, param=param)
    return Response(body, status=status, content_type="application/json")


def json_response(body: Any) -> Response:
    return Response(json.dumps(body), content_type="application/json")


async def stop_when_orphaned(stop: asyncio.Event, interval: float = 1.0) -> None:
    """Set `stop` when the server that started this runner is gone.

    A server killed with SIGKILL cannot stop its runners; they are re-parented and
    would hold their model's memory forever. Where the kernel can say when a process
    exits (Linux's pidfd), the runner sleeps until then. Otherwise it looks every
    `interval` seconds whether its parent's PID changed. Waking every second had
    a cost: an idle runner's first `llama_decode` took up to twice as long
    (docs/benchmarks.md, "The first step after an idle spell").
    """
    parent = os.getppid()
    try:
        exited = os.pidfd_open(parent)
    except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
        exited = None
    if exited is not None:
        loop = asyncio.get_running_loop()
        loop.add_reader(exited, stop.set)
        try:
            if os.getppid() != parent:  # gone before the pidfd was opened
                stop.set()
            await stop.wait()
        finally:
            loop.remove_reader(exited)
            os.close(exited)
        return
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
        drop_box: DropBox | None = DropBox(drop_box_path(socket_path))
    except OSError as error:  # streams then all go through the server
        logging.getLogger(__name__).warning("no direct streams: %s", error)
        drop_box = None
    try:
        await serve(_with_drop_box(app, drop_box), config, shutdown_trigger=stop.wait)
    finally:
        orphan_watch.cancel()
        if drop_box is not None:
            drop_box.close()
        socket_path.unlink(missing_ok=True)  # noqa: ASYNC240


def _with_drop_box(app: Any, drop_box: DropBox | None) -> Any:
    """`app` with the drop box in every request's scope (dmr/direct_streams.py)."""
    if drop_box is None:
        return app

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope[DIRECT_SCOPE_KEY] = drop_box
        await app(scope, receive, send)

    return asgi
