"""Which requests are batch work: the server's `x-dmr-priority: batch` header, read once
per request into a context variable that the generation routes give their jobs.

The batching loop serves interactive requests first and preempts batch ones for them
(runner/batching.py, docs/batch.md "Interactive first").
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from dmr.sdk.runner import BATCH_PRIORITY, PRIORITY_HEADER, Receive, Send

__all__ = ["PriorityScope", "batch_request"]

# True while the current request is batch work (set by `PriorityScope`).
batch_request: ContextVar[bool] = ContextVar("batch_request", default=False)

_HEADER = PRIORITY_HEADER.encode()
_BATCH = BATCH_PRIORITY.encode()


class PriorityScope:
    """ASGI: runs `app` with `batch_request` set for a request the server marked as batch.

    Quart and the streaming fast path both run the request in tasks started from here,
    which copy the context, so the routes read the variable wherever they run."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_batch(scope.get("headers", ())):
            token = batch_request.set(True)
            try:
                await self.app(scope, receive, send)
            finally:
                batch_request.reset(token)
            return
        await self.app(scope, receive, send)


def _is_batch(headers: Any) -> bool:
    return any(name == _HEADER and value.strip().lower() == _BATCH for name, value in headers)
