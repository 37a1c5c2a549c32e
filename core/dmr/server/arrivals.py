"""Whether a request reached the server alone: the hint behind `LONE_HEADER`.

A runner that batches requests (the llama.cpp runner) waits a few milliseconds after
a request reaches its idle decode loop, in case it opens a burst: requests sent
together reach the runner several milliseconds apart, each parsed and tokenized in
Python first, and a step started on the first alone would make the rest wait a whole
step (plugins/llamacpp's runner/burst.py). For a request nothing else came with, that
wait is pure delay: 2.5-4.5 ms of SmolLM2's 18-22 ms to the first token on 2 CPU cores
(docs/benchmarks.md, session 31).

The server sees every request first, so it can tell: a request is alone when no other
reached the server in the `NEIGHBOUR_S` before it, nor any after it until it is
forwarded. Requests sent together reach the server within about a millisecond of each
other, and the server takes longer than that to forward the first, so a burst's first
request sees the second. The runner then skips its wait for a request marked alone;
one not marked (a burst, or a request straight to the runner) waits as before.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from dmr.runner_support import LONE_HEADER, LONE_VALUE

__all__ = ["NEIGHBOUR_S", "Arrival", "Arrivals", "ArrivalsMiddleware", "lone_headers"]

# A request that came this soon after another is taken to be part of a burst with it.
# The runner's own burst gap (3 ms) is measured at its decode loop, after the server's
# and the runner's Python: at the server's door the same burst is as close or closer.
NEIGHBOUR_S = 0.003


@dataclass(frozen=True)
class Arrival:
    at: float  # time.monotonic() when the request reached the server
    number: int  # how many requests had reached it, this one included
    after_previous_s: float  # since the request before it (inf: the first)


class Arrivals:
    """The server's count of the requests that reached it, and when the last did."""

    def __init__(self, neighbour_s: float = NEIGHBOUR_S) -> None:
        self.neighbour_s = neighbour_s
        self.count = 0
        self._last = float("-inf")

    def arrive(self) -> Arrival:
        now = time.monotonic()
        self.count += 1
        arrival = Arrival(now, self.count, now - self._last)
        self._last = now
        return arrival

    def alone(self, arrival: Arrival) -> bool:
        """No other request reached the server since `arrival`, nor just before it."""
        return self.count == arrival.number and arrival.after_previous_s >= self.neighbour_s


# The arrival of the request being served in this task, and the server's record (set by
# `ArrivalsMiddleware`; None outside a request, as for the Batch API's own lines).
_current: ContextVar[tuple[Arrivals, Arrival] | None] = ContextVar(
    "dmr_request_arrival", default=None
)


def lone_headers() -> dict[str, str]:
    """The header that tells the runner this task's request came alone (else none)."""
    current = _current.get()
    if current is None:
        return {}
    arrivals, arrival = current
    return {LONE_HEADER: LONE_VALUE} if arrivals.alone(arrival) else {}


class ArrivalsMiddleware:
    """ASGI: counts every HTTP request as it reaches the server and sets `_current` for
    it. Quart runs the request in tasks started from here, which copy the context."""

    def __init__(
        self,
        app: Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]],
        arrivals: Arrivals | None = None,
    ) -> None:
        self.app = app
        self.arrivals = arrivals or Arrivals()

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _current.set((self.arrivals, self.arrivals.arrive()))
        try:
            await self.app(scope, receive, send)
        finally:
            _current.reset(token)
