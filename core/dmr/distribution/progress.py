"""Throttled transfer progress (docs/compatibility.md §4): one line per layer every ~100 ms or 1 MB.

Transfers run in worker threads while the progress callback belongs to the event
loop (the route streams it as NDJSON), so `TransferProgress` is thread-safe and
hands each event to an `emit` function that crosses back to the loop. A cancelled
transfer is told to stop through an event its threads check between chunks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from dmr.errors import DmrError
from dmr.records import ProgressCallback, ProgressEvent

__all__ = [
    "MIN_BYTES",
    "MIN_INTERVAL",
    "TransferCancelledError",
    "TransferProgress",
    "format_megabytes",
    "loop_callback",
    "run_transfer",
    "transfer_pool",
]

T = TypeVar("T")

MIN_INTERVAL = 0.1  # seconds between two lines for one layer
MIN_BYTES = 1 << 20  # or this many new bytes, whichever comes first


class TransferCancelledError(DmrError):
    """The pull or push was cancelled (client went away); partial blobs stay for resume."""

    status = 499
    code = "cancelled"


def format_megabytes(count: int) -> str:
    return f"{count / 1_000_000:.2f} MB"


class TransferProgress:
    """Counts bytes per layer and reports them, throttled, through `emit`."""

    def __init__(
        self,
        emit: ProgressCallback,
        *,
        mode: str,
        total: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._mode = mode
        self._total = total
        self._clock = clock
        self._lock = threading.Lock()
        self._current: dict[str, int] = {}
        self._last_sent: dict[str, tuple[float, int]] = {}

    @property
    def verb(self) -> str:
        return "Uploaded" if self._mode == "push" else "Downloaded"

    def transferred(self) -> int:
        with self._lock:
            return sum(self._current.values())

    def update(self, layer_id: str, layer_size: int, layer_current: int) -> None:
        """Record that `layer_current` bytes of a layer are done; maybe emit a line."""
        with self._lock:
            self._current[layer_id] = layer_current
            now = self._clock()
            sent_at, sent_bytes = self._last_sent.get(layer_id, (float("-inf"), -1))
            finished = layer_current >= layer_size
            due = now - sent_at >= MIN_INTERVAL or layer_current - sent_bytes >= MIN_BYTES
            if not (due or (finished and sent_bytes != layer_current)):
                return
            self._last_sent[layer_id] = (now, layer_current)
            done = sum(self._current.values())
        self._emit(
            ProgressEvent(
                type="progress",
                message=f"{self.verb}: {format_megabytes(done)}",
                mode=self._mode,
                total=self._total,
                layer_id=layer_id,
                layer_size=layer_size,
                layer_current=layer_current,
            )
        )

    def message(self, text: str, *, type: str = "success") -> None:
        self._emit(ProgressEvent(type=type, message=text, mode=self._mode, total=self._total))


def loop_callback(progress: ProgressCallback) -> ProgressCallback:
    """A callback usable from any worker thread that runs `progress` on the event loop."""
    token = anyio.lowlevel.current_token()

    def emit(event: ProgressEvent) -> None:
        # RuntimeError: the loop is gone (server shutting down), nobody is listening.
        with suppress(RuntimeError):
            anyio.from_thread.run_sync(progress, event, token=token)

    return emit


async def run_transfer(work: Callable[[threading.Event], T]) -> T:
    """Run blocking `work(stop)` in a thread; on cancellation tell it to stop."""
    stop = threading.Event()
    try:
        return await anyio.to_thread.run_sync(work, stop, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        stop.set()
        raise


@contextmanager
def transfer_pool(size: int) -> Iterator[ThreadPoolExecutor]:
    """Threads for parallel layer transfers; leaving waits for them (they stop on `stop`)."""
    pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="dmr-layer")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
