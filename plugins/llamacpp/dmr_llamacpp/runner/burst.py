"""How long an idle runner waits for the rest of a burst before its first step.

An idle runner that gets a request waits `gap_s` (`--burst-gap-ms`, default
BURST_GAP_S) for another before its first step. Once a second one has come it is a
burst, and the runner waits up to BURST_FOLLOW_GAP_S for each next one, up to
BURST_WINDOW_S in all or until every open slot has a request. A lone request waits only
the short gap.

Requests sent together reach the decode thread several milliseconds apart: each is
parsed, templated and tokenized in Python first, by the server and then by the
runner, on the same cores as the client that sends them. A step started on part of
a burst takes those cores from the rest, which then arrive slower still and wait a
whole step more: their first token comes a step later than llama-server's, whose
C++ front end lets a burst in within a millisecond or two (docs/benchmarks.md has
the A/Bs that chose these gaps).

A request that `dmr serve` saw come alone (its `x-dmr-lone` header, dmr/server/
arrivals.py) opens no burst: the decode loop starts it without the gap, which was
2.5-4.5 ms of SmolLM2's time to the first token (docs/benchmarks.md, session 31).
"""

from __future__ import annotations

import queue
import time
from typing import TypeVar

__all__ = ["BURST_FOLLOW_GAP_S", "BURST_GAP_S", "BURST_WINDOW_S", "collect_burst"]

BURST_GAP_S = 0.003
BURST_FOLLOW_GAP_S = 0.025
BURST_WINDOW_S = 0.06

Item = TypeVar("Item")


def collect_burst(
    incoming: queue.Queue[Item],
    first: Item,
    *,
    limit: int,
    gap_s: float = BURST_GAP_S,
    follow_gap_s: float = BURST_FOLLOW_GAP_S,
    window_s: float = BURST_WINDOW_S,
) -> list[Item]:
    """`first` and what follows it on `incoming`: what is queued already, then what
    comes within the gaps, until `limit` items, the window's end, or a `None` (a stop
    request, returned last)."""
    deadline = time.perf_counter() + window_s
    taken = [first]
    while taken[-1] is not None and len(taken) < limit:
        try:
            taken.append(incoming.get_nowait())
            continue
        except queue.Empty:
            pass
        left = deadline - time.perf_counter()
        if gap_s <= 0 or left <= 0:
            break
        gap = gap_s if len(taken) < 2 else max(gap_s, follow_gap_s)
        try:
            taken.append(incoming.get(timeout=min(gap, left)))
        except queue.Empty:
            break
    return taken
