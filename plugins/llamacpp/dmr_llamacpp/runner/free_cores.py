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

__all__ = ["WINDOW_S", "FreeCores", "read_running"]

LOADAVG = Path("/proc/loadavg")
# Long enough that a process which only runs between steps is seen idle at least
# once (about 20 steps of a small model), short enough to react within a slow step.
WINDOW_S = 0.25


def read_running(path: Path = LOADAVG) -> int | None:
    """The tasks runnable on the machine now (the `R` of /proc/loadavg's `R/T`)."""
    try:
        return int(path.read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
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
        return cls(allowed)

    def sample(self, own_running: int) -> None:
        """After a decode that computed with `own_running` threads (they are all still
        running: llama.cpp's workers spin for milliseconds after each step)."""
        running = self._read()
        if running is None:
            return
        now = self._clock()
        self._others.append((now, max(0, running - own_running)))
        while len(self._others) > 1 and now - self._others[0][0] > self._window_s:
            self._others.popleft()

    def free(self) -> int:
        """Cores left to this runner's threads (at least one)."""
        if not self._others:
            return self.cpus
        return max(1, self.cpus - min(others for _at, others in self._others))
