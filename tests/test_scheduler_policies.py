"""The scheduler's pure policies: admission, keep-alive, crash explanations, flag checks,
the order of requests waiting for memory."""

from __future__ import annotations

import signal
from dataclasses import dataclass

import pytest
from dmr.errors import InvalidRequestError
from dmr.records import EngineSpec, Mode
from dmr.scheduler import validate_runtime_flags
from dmr.scheduler.admission import plan_admission
from dmr.scheduler.keepalive import idle_deadline_seconds
from dmr.scheduler.runner_process import explain_exit
from dmr.scheduler.wait_queue import Priority, WaitQueue
from dmr.scheduler.wait_times import SecondsHistogram


@dataclass
class FakeResident:
    name: str
    memory: int
    evictable: bool
    last_used: float
    device_key: tuple[str, int] = ("cpu", 0)


def test_admission_fits_without_eviction() -> None:
    plan = plan_admission(4, 10, [FakeResident("a", 5, True, 1.0)])
    assert plan.fits and plan.evict == ()


def test_admission_evicts_least_recently_used_idle_runners_only() -> None:
    old = FakeResident("old", 4, True, 1.0)
    busy = FakeResident("busy", 4, False, 0.5)
    recent = FakeResident("recent", 1, True, 3.0)

    plan = plan_admission(5, 10, [recent, busy, old])

    assert plan.fits and [r.name for r in plan.evict] == ["old"]  # type: ignore[attr-defined]


def test_admission_waits_when_busy_runners_hold_the_memory() -> None:
    plan = plan_admission(5, 10, [FakeResident("busy", 8, False, 1.0)])
    assert not plan.fits and not plan.never_fits


def test_admission_never_fits_beyond_the_budget() -> None:
    plan = plan_admission(11, 10, [])
    assert plan.never_fits and not plan.fits


@pytest.mark.parametrize(
    ("keep_alive", "idle_timeout", "expected"),
    [
        (None, 300.0, 300.0),
        (None, 0.0, None),  # MODEL_RUNNER_IDLE_TIMEOUT=0: never
        (0.0, 300.0, 0.0),  # keep_alive 0: right after the request
        (-1.0, 300.0, None),  # negative: never
        (600.0, 0.0, 600.0),  # the model's keep_alive wins
    ],
)
def test_idle_deadline(
    keep_alive: float | None, idle_timeout: float, expected: float | None
) -> None:
    assert idle_deadline_seconds(keep_alive, idle_timeout) == expected


@pytest.mark.parametrize(
    ("code", "tail", "expected"),
    [
        (1, ["CUDA error: out of memory"], "ran out of memory"),
        (-6, ["terminate called after throwing an instance of 'std::bad_alloc'"], "out of memory"),
        (1, ["llama_model_load: error loading model: invalid magic"], "could not load the model"),
        (-signal.SIGKILL, [], "out-of-memory killer"),
        (-signal.SIGSEGV, ["boom"], "SIGSEGV"),
        (3, ["something else"], "exited with code 3"),
    ],
)
def test_crash_explanations(code: int, tail: list[str], expected: str) -> None:
    assert expected in explain_exit(code, tail)


SPEC = EngineSpec(
    name="demo",
    formats=frozenset({"gguf"}),
    modes=frozenset({Mode.COMPLETION}),
    engine=None,  # type: ignore[arg-type]
    allowed_flags=frozenset({"--temp", "--threads"}),
)


@pytest.mark.parametrize(
    "flags",
    [["--temp", "0.5"], ["--temp=0.5", "--threads", "4"], ["--temp", "-1"], []],
)
def test_allowed_flags_pass(flags: list[str]) -> None:
    assert validate_runtime_flags(SPEC, flags) == tuple(flags)


@pytest.mark.parametrize(
    "flags",
    [
        ["--model", "x"],  # not on the list
        ["--temp", "/etc/passwd"],  # a path
        ["--temp=C:\\x"],
        ["0.5"],  # a value without a flag
        ["--temp=0.5", "7"],  # a value after a flag that already had one
    ],
)
def test_other_flags_are_refused(flags: list[str]) -> None:
    with pytest.raises(InvalidRequestError):
        validate_runtime_flags(SPEC, flags)


# --------------------------------------------------------------------------- waiting order

A = ("eng", "sha256:a", Mode.COMPLETION)
B = ("eng", "sha256:b", Mode.COMPLETION)
CPU = ("cpu", 0)
GPU = ("cuda", 0)


async def test_waiters_are_kept_by_priority_then_arrival() -> None:
    queue = WaitQueue()
    batch = queue.add(A, "a", CPU, Priority.BATCH)
    first = queue.add(B, "b", CPU, Priority.INTERACTIVE)
    second = queue.add(A, "a", CPU, Priority.INTERACTIVE)
    later_batch = queue.add(B, "b", CPU, Priority.BATCH)

    assert list(queue) == [first, second, batch, later_batch]
    queue.remove(first)
    assert list(queue) == [second, batch, later_batch] and len(queue) == 3


async def test_a_turn_is_owed_only_after_the_fair_wait_and_only_on_its_device() -> None:
    queue = WaitQueue()
    waiting_b = queue.add(B, "b", CPU, Priority.INTERACTIVE)

    assert queue.turn_owed(A, CPU, Priority.INTERACTIVE, fair_wait=60) is None  # not yet
    assert queue.turn_owed(A, CPU, Priority.INTERACTIVE, fair_wait=0) is waiting_b
    assert queue.turn_owed(A, GPU, Priority.INTERACTIVE, fair_wait=0) is None  # other device
    assert queue.turn_owed(B, CPU, Priority.INTERACTIVE, fair_wait=0) is None  # same runner
    # A waiter is held back only by those ahead of it.
    behind = queue.add(A, "a", CPU, Priority.INTERACTIVE)
    assert queue.turn_owed(A, CPU, Priority.INTERACTIVE, 0, before=behind) is waiting_b
    assert queue.turn_owed(B, CPU, Priority.INTERACTIVE, 0, before=waiting_b) is None


async def test_a_waiting_batch_request_never_holds_back_interactive_ones() -> None:
    queue = WaitQueue()
    batch_b = queue.add(B, "b", CPU, Priority.BATCH)

    assert queue.turn_owed(A, CPU, Priority.INTERACTIVE, fair_wait=0) is None
    assert queue.turn_owed(A, CPU, Priority.BATCH, fair_wait=0) is batch_b
    assert not queue.wants_memory_on(CPU, Priority.INTERACTIVE, joinable=set())
    assert queue.wants_memory_on(CPU, Priority.BATCH, joinable=set())
    assert not queue.wants_memory_on(CPU, Priority.BATCH, joinable={B})  # b is loaded


async def test_the_queue_by_runner_counts_waiters_and_the_oldest_wait() -> None:
    queue = WaitQueue()
    queue.add(B, "b", CPU, Priority.INTERACTIVE)
    queue.add(B, "b", CPU, Priority.INTERACTIVE)
    queue.add(A, "a", CPU, Priority.INTERACTIVE)

    counts = {entry.model: entry.waiting for entry in queue.by_runner()}
    assert counts == {"b": 2, "a": 1}
    assert all(entry.oldest_wait >= 0 for entry in queue.by_runner())


def test_wait_histogram_buckets_are_cumulative() -> None:
    histogram = SecondsHistogram()
    for seconds in (0.01, 0.3, 0.3, 500.0):
        histogram.observe(seconds)
    buckets = dict(histogram.cumulative())
    assert buckets["0.05"] == 1 and buckets["0.25"] == 1 and buckets["1"] == 3
    assert buckets["300"] == 3 and buckets["+Inf"] == 4
    assert histogram.longest == 500.0 and histogram.total == pytest.approx(500.61)


def test_admission_evicts_only_what_may_evict_allows() -> None:
    recent = FakeResident("recent", 8, True, 10.0)
    old = FakeResident("old", 8, True, 1.0)
    only_old = lambda r: r.last_used < 5  # noqa: E731 - batch work: long idle only

    assert not plan_admission(8, 10, [recent], may_evict=only_old).fits
    plan = plan_admission(8, 10, [recent, old], may_evict=only_old)
    assert not plan.fits  # old alone frees 8, but recent still holds 8 of 10
    plan = plan_admission(8, 16, [recent, old], may_evict=only_old)
    assert plan.fits and [r.name for r in plan.evict] == ["old"]  # type: ignore[attr-defined]
