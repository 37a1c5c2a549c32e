"""Requests waiting for runner memory, in the order they are served.

One shared "capacity changed" event used to wake every waiter at once, in no
order, and a request for a loaded model was admitted whenever its runner had a
free slot. Clients that kept one model busy could then starve a request for
another model for ever. Here waiters are kept in order (priority, then arrival)
and two rules give each its turn (docs/scheduler.md, "Waiting for memory"):

- Memory goes in order: a request that needs a new runner on a device never
  takes memory ahead of an earlier one that needs memory on that device.
- A turn is owed after `fair_wait`: once a request for a model that is not loaded
  has waited that long, requests for the loaded models on its device stop
  joining their runners and queue behind it. Those runners drain, become idle,
  are evicted, and the waiting model is loaded.

Batch requests (`Priority.BATCH`) sort behind every interactive one, and a waiting
batch request never holds back an interactive one.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from dmr.runner_support import BATCH_PRIORITY, PRIORITY_HEADER

if TYPE_CHECKING:
    from dmr.records import Mode
    from dmr.scheduler.runner import Runner, RunnerKey

__all__ = [
    "Priority",
    "QueuedModel",
    "WaitQueue",
    "Waiter",
    "priority_headers",
    "request_priority",
]


class Priority(IntEnum):
    """Lower is served first."""

    INTERACTIVE = 0
    BATCH = 1


# The priority of the request being served in this task: the Batch API sets BATCH
# around the requests it sends through the app, and `Scheduler.acquire` and the
# proxy read it, so a batch line needs no special route of its own.
request_priority: ContextVar[Priority] = ContextVar(
    "request_priority", default=Priority.INTERACTIVE
)


def priority_headers() -> dict[str, str]:
    """The headers that tell the runner this task's request is batch work (none for an
    interactive one), so its batching loop serves interactive requests first."""
    if request_priority.get() is Priority.BATCH:
        return {PRIORITY_HEADER: BATCH_PRIORITY}
    return {}


@dataclass(eq=False)
class Waiter:
    """One request waiting for a runner; `admitted` gets the runner it may use."""

    key: RunnerKey
    model: str  # as the client named it, for messages and metrics
    device: tuple[str, int]  # the device its runner would be placed on
    priority: Priority
    seq: int
    since: float = field(default_factory=time.monotonic)
    # Set once it has held back a request for another runner: a turn it was owed.
    held_back: bool = False
    admitted: asyncio.Future[Runner] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def waited(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.since

    def holds_back(self, other: Waiter | None, key: RunnerKey, device: tuple[str, int],
                   priority: Priority, fair_wait: float, now: float) -> bool:  # fmt: skip
        """Whether this waiter, owed its turn, keeps a request for runner `key` (the
        waiter `other`, or a new request when None) from joining that runner."""
        return (
            self is not other
            and self.key != key
            and self.device == device
            and self.priority <= priority
            and self.waited(now) >= fair_wait
        )


@dataclass(frozen=True)
class QueuedModel:
    """The waiters for one (engine, model, mode), for `/engines/queue` and `/metrics`."""

    model: str
    model_id: str
    backend: str
    mode: Mode
    waiting: int
    oldest_wait: float


class WaitQueue:
    """Waiters in service order: by priority, then arrival."""

    def __init__(self) -> None:
        self._waiters: list[Waiter] = []
        self._seq = itertools.count()

    def add(self, key: RunnerKey, model: str, device: tuple[str, int],
            priority: Priority) -> Waiter:  # fmt: skip
        waiter = Waiter(key=key, model=model, device=device, priority=priority,
                        seq=next(self._seq))  # fmt: skip
        # Stable: among equal priorities, arrival order.
        index = len(self._waiters)
        while index > 0 and self._waiters[index - 1].priority > priority:
            index -= 1
        self._waiters.insert(index, waiter)
        return waiter

    def remove(self, waiter: Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def __len__(self) -> int:
        return len(self._waiters)

    def __iter__(self) -> Iterator[Waiter]:
        # A copy: serving a waiter removes it while the scheduler walks the queue.
        return iter(list(self._waiters))

    def turn_owed(self, key: RunnerKey, device: tuple[str, int], priority: Priority,
                  fair_wait: float, *, before: Waiter | None = None) -> Waiter | None:  # fmt: skip
        """The first waiter ahead of `before` (of everyone, for a new request) that is
        owed its turn against a request joining runner `key` on `device`."""
        now = time.monotonic()
        for waiter in self._waiters:
            if waiter is before:
                return None
            if waiter.holds_back(before, key, device, priority, fair_wait, now):
                return waiter
        return None

    def wants_memory_on(self, device: tuple[str, int], priority: Priority,
                        joinable: set[RunnerKey]) -> bool:  # fmt: skip
        """Whether someone at `priority` or better waits for new memory on `device`
        (a new request needing memory there queues behind them)."""
        return any(
            waiter.device == device and waiter.priority <= priority
            and waiter.key not in joinable
            for waiter in self._waiters
        )  # fmt: skip

    def by_runner(self) -> list[QueuedModel]:
        now = time.monotonic()
        groups: dict[RunnerKey, list[Waiter]] = {}
        for waiter in self._waiters:
            groups.setdefault(waiter.key, []).append(waiter)
        return [
            QueuedModel(
                model=waiters[0].model,
                model_id=key[1],
                backend=key[0],
                mode=key[2],
                waiting=len(waiters),
                oldest_wait=max(waiter.waited(now) for waiter in waiters),
            )
            for key, waiters in groups.items()
        ]
