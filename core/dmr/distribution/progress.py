"""Throttled transfer progress (docs/compatibility.md §4): one line per layer every ~100 ms or 1 MB.

Transfers run in worker threads while the progress callback belongs to the event
loop (the route streams it as NDJSON), so `TransferProgress` is thread-safe and
hands each event to an `emit` function that crosses back to the loop. A cancelled
transfer is told to stop through an event its threads check between chunks.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import TypeVar

import anyio
import anyio.to_thread

from dmr.errors import DmrError
from dmr.records import ProgressCallback, ProgressEvent

__all__ = [
    "MIN_BYTES",
    "MIN_INTERVAL",
    "LoopEmitter",
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


def loop_callback(progress: ProgressCallback) -> LoopEmitter:
    """A callback usable from any worker thread that runs `progress` on the event loop."""
    return LoopEmitter(asyncio.get_running_loop(), progress)


DELIVERY_INTERVAL = 0.05  # seconds: the loop wakes at most this often for a stream of events


class LoopEmitter:
    """Events from worker threads, delivered on the loop in the order they came.

    The worker never waits for the loop, and the loop is woken once for a batch:
    the first event of a quiet spell wakes it at once, the ones that follow within
    `DELIVERY_INTERVAL` go together. Waiting on the loop for each event (a round
    trip per MB) took 40% of a download thread's time on a registry on this machine,
    and a wake-up per event still took 20% (docs/benchmarks.md, "Pull speed").
    Every event is still delivered: `flush()` (on the loop; `run_transfer` calls it)
    delivers what is left when the transfer ends, before its result is used.
    An error raised by `progress` fails the transfer at its next event.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, progress: ProgressCallback) -> None:
        self._loop = loop
        self._progress = progress
        self._lock = threading.Lock()
        self._pending: list[ProgressEvent] = []
        self._scheduled = False  # a delivery is due (soon or after the interval)
        self._failure: BaseException | None = None

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            if self._failure is not None:
                raise self._failure
            self._pending.append(event)
            if self._scheduled:
                return
            self._scheduled = True
        # RuntimeError: the loop is closed (server shutting down), nobody is listening.
        with suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            events, self._pending = self._pending, []
            # Events came: more are likely, so collect them for an interval. None
            # came since the last delivery: the next one wakes the loop itself.
            self._scheduled = bool(events)
        if events:
            self._loop.call_later(DELIVERY_INTERVAL, self._deliver)
        self._run(events)

    def flush(self) -> None:
        """Deliver what is pending now (call on the loop, once the workers are done)."""
        with self._lock:
            events, self._pending = self._pending, []
        self._run(events)

    def _run(self, events: list[ProgressEvent]) -> None:
        for event in events:
            try:
                self._progress(event)
            except Exception as error:
                with self._lock:
                    self._failure = error
                return


async def run_transfer(
    work: Callable[[threading.Event], T], emitter: LoopEmitter | None = None
) -> T:
    """Run blocking `work(stop)` in a thread; on cancellation tell it to stop. The
    progress `emitter` it reports through is flushed before the result is returned."""
    stop = threading.Event()
    try:
        return await anyio.to_thread.run_sync(work, stop, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        stop.set()
        raise
    finally:
        if emitter is not None:
            emitter.flush()


@contextmanager
def transfer_pool(size: int) -> Iterator[ThreadPoolExecutor]:
    """Threads for parallel layer transfers; leaving waits for them (they stop on `stop`)."""
    pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="dmr-layer")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
