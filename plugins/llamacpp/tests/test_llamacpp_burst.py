"""The idle runner's wait for the rest of a burst (`collect_burst`), with real threads
and a real queue; the gaps are scaled up so a loaded machine cannot blur them."""

from __future__ import annotations

import queue
import threading
import time

from dmr_llamacpp.runner.burst import collect_burst


def _put_later(incoming: queue.Queue[str | None], delays_s: list[float], item: str) -> None:
    """Put `item` + index on `incoming` at each of `delays_s` from now."""

    def run() -> None:
        started = time.perf_counter()
        for index, delay in enumerate(delays_s):
            time.sleep(max(0.0, started + delay - time.perf_counter()))
            incoming.put(f"{item}{index}")

    threading.Thread(target=run, daemon=True).start()


def test_a_lone_request_waits_only_the_short_gap() -> None:
    incoming: queue.Queue[str | None] = queue.Queue()
    _put_later(incoming, [0.6], "late")
    started = time.perf_counter()
    taken = collect_burst(incoming, "first", limit=8, gap_s=0.05, follow_gap_s=2, window_s=5)
    assert taken == ["first"]
    assert time.perf_counter() - started < 0.5


def test_a_burst_keeps_gathering_past_the_short_gap() -> None:
    """Once a second request has come, later ones more than the short gap apart
    (but within the follow gap) still join the first step."""
    incoming: queue.Queue[str | None] = queue.Queue()
    incoming.put("second")
    _put_later(incoming, [0.3, 0.6], "slow")
    taken = collect_burst(incoming, "first", limit=8, gap_s=0.05, follow_gap_s=2, window_s=5)
    assert taken == ["first", "second", "slow0", "slow1"]


def test_the_window_bounds_the_wait() -> None:
    incoming: queue.Queue[str | None] = queue.Queue()
    incoming.put("second")
    _put_later(incoming, [0.2, 0.4, 1.5, 1.7], "slow")
    started = time.perf_counter()
    taken = collect_burst(incoming, "first", limit=8, gap_s=0.05, follow_gap_s=2, window_s=0.8)
    assert taken == ["first", "second", "slow0", "slow1"]
    assert time.perf_counter() - started < 1.4


def test_a_full_set_of_slots_starts_at_once() -> None:
    incoming: queue.Queue[str | None] = queue.Queue()
    for item in ("b", "c", "d"):
        incoming.put(item)
    started = time.perf_counter()
    taken = collect_burst(incoming, "a", limit=3, gap_s=1, follow_gap_s=2, window_s=5)
    assert taken == ["a", "b", "c"]
    assert incoming.get_nowait() == "d"  # left for the next step
    assert time.perf_counter() - started < 0.5


def test_a_stop_request_ends_the_burst() -> None:
    incoming: queue.Queue[str | None] = queue.Queue()
    incoming.put("second")
    incoming.put(None)
    incoming.put("after")
    taken = collect_burst(incoming, "first", limit=8, gap_s=1, follow_gap_s=2, window_s=5)
    assert taken == ["first", "second", None]


def test_no_gap_takes_only_what_is_queued() -> None:
    incoming: queue.Queue[str | None] = queue.Queue()
    incoming.put("second")
    _put_later(incoming, [0.2], "late")
    taken = collect_burst(incoming, "first", limit=8, gap_s=0, follow_gap_s=2, window_s=5)
    assert taken == ["first", "second"]
