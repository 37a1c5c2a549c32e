"""The scheduler's pure policies: admission, keep-alive, crash explanations, flag checks."""

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
