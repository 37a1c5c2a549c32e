"""How many of the machine's cores other processes leave to llama.cpp's threads.

llama.cpp's CPU threads meet at a barrier after every matrix product, and spin
there. When a process outside dmr keeps a core busy (a build, a browser, another
inference server), one of a runner's threads per busy core has to share a core:
at each barrier the others spin until the scheduler gives it its turn again, a
time slice per barrier. Measured on a 2-core machine next to one busy process
(docs/benchmarks.md, "A busy neighbour"): SmolLM2's decode step went from 14 ms to
1.3-2.8 s with two threads, and takes about 25 ms with one.

So after each `llama_decode` the runner's decode thread reads the count of
runnable tasks in /proc/loadavg (all of the machine's, its own thread and llama.cpp's
spinning workers included) and takes away the threads it computed with: what is
left runs elsewhere. The fewest of those over the last `WINDOW_S` count: a process
that runs now and then (the runner's own event loop, `dmr serve` relaying a token)
never takes a thread away, one that keeps a core busy does within a step, and a
core it frees is taken back at the next step.

/proc/loadavg counts every CPU of the machine; a process held to some of them (a
cpuset, `taskset`) cannot tell which are busy, so there the runner keeps its threads.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

__all__ = ["WINDOW_S", "FreeCores", "LoadavgReader", "read_running"]

LOADAVG = Path("/proc/loadavg")
# Long enough that a process which only runs between steps is seen idle at least
# once (about 20 steps of a small model), short enough to react within a slow step.
WINDOW_S = 0.25


def read_running(path: Path = LOADAVG) -> int | None:
    """The tasks runnable on the machine now (the `R` of /proc/loadavg's `R/T`)."""
    try:
        return _running(path.read_bytes())
    except OSError:
        return None


def _running(loadavg: bytes) -> int | None:
    try:
        return int(loadavg.split()[3].split(b"/")[0])
    except (ValueError, IndexError):
        return None


class LoadavgReader:
    """`read_running` at a step's pace: the file is kept open and read again from its
    start (about 1 µs, where opening it each time takes about 9)."""

    def __init__(self, path: Path = LOADAVG) -> None:
        self._fd = os.open(path, os.O_RDONLY)

    def __call__(self) -> int | None:
        try:
            return _running(os.pread(self._fd, 128, 0))
        except OSError:
            return None


class FreeCores:
    """The cores other processes leave free, from samples taken after each decode."""

    def __init__(
        self,
        cpus: int,
        read: Callable[[], int | None] = read_running,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = WINDOW_S,
    ) -> None:
        self.cpus = cpus
        self._read = read
        self._clock = clock
        self._window_s = window_s
        # (when, others) of the samples in the window that may still be its fewest:
        # each is fewer than every one before it, so the first is the window's minimum.
        self._others: deque[tuple[float, int]] = deque()

    @classmethod
    def for_this_process(cls) -> FreeCores | None:
        """Sampling for this process; None where it cannot tell (see the module's doc)."""
        try:
            allowed = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return None
        if allowed != os.cpu_count() or read_running() is None:
            return None
        try:
            return cls(allowed, read=LoadavgReader())
        except OSError:
            return None

    def sample(self, own_running: int) -> None:
        """After a decode that computed with `own_running` threads (they are all still
        running: llama.cpp's workers spin for milliseconds after each step)."""
        running = self._read()
        if running is None:
            return
        now = self._clock()
        others = max(0, running - own_running)
        while self._others and self._others[-1][1] >= others:
            self._others.pop()  # never the fewest again while this sample is in the window
        self._others.append((now, others))
        while len(self._others) > 1 and now - self._others[0][0] > self._window_s:
            self._others.popleft()

    def free(self) -> int:
        """Cores left to this runner's threads (at least one)."""
        if not self._others:
            return self.cpus
        return max(1, self.cpus - self._others[0][1])
