"""Which requests are batch work (the server's `x-dmr-priority: batch` header) and which
reached the server alone (`x-dmr-lone: 1`): read once per request into context
variables that the generation routes give their jobs.

The batching loop serves interactive requests first and preempts batch ones for them
(runner/batching.py, docs/batch.md "Interactive first"), and starts a lone request's
first step without waiting for the rest of a burst (runner/burst.py).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from dmr.sdk.runner import (
    BATCH_PRIORITY,
    LONE_HEADER,
    LONE_VALUE,
    PRIORITY_HEADER,
    Receive,
    Send,
)

__all__ = ["PriorityScope", "batch_request", "lone_request"]

# True while the current request is batch work (set by `PriorityScope`).
batch_request: ContextVar[bool] = ContextVar("batch_request", default=False)
# True while the current request is one the server saw come alone (set by `PriorityScope`).
lone_request: ContextVar[bool] = ContextVar("lone_request", default=False)

_HEADER = PRIORITY_HEADER.encode()
_BATCH = BATCH_PRIORITY.encode()
_LONE_HEADER = LONE_HEADER.encode()
_LONE = LONE_VALUE.encode()


class PriorityScope:
    """ASGI: runs `app` with `batch_request` set for a request the server marked as batch,
    and `lone_request` for one it marked as alone.

    Quart and the streaming fast path both run the request in tasks started from here,
    which copy the context, so the routes read the variable wherever they run."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        batch = batch_request.set(_has(headers, _HEADER, _BATCH))
        lone = lone_request.set(_has(headers, _LONE_HEADER, _LONE))
        try:
            await self.app(scope, receive, send)
        finally:
            lone_request.reset(lone)
            batch_request.reset(batch)


def _has(headers: Any, name: bytes, value: bytes) -> bool:
    return any(key == name and found.strip().lower() == value for key, found in headers)
