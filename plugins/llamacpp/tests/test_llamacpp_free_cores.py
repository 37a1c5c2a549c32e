"""The cores other processes leave free (runner/free_cores.py), from samples of the
machine's runnable tasks. The readings here are a fake /proc/loadavg (a list the test
fills, or a file it writes) and a fake clock; the runner reading the real one next to
real busy processes is tests/test_free_cores_smollm2.py's."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from dmr_llamacpp.runner import free_cores
from dmr_llamacpp.runner.__main__ import yields_busy_cores
from dmr_llamacpp.runner.free_cores import WINDOW_S, FreeCores, LoadavgReader, read_running
from dmr_llamacpp.settings import WorkerSettings


class FakeLoad:
    """Fake /proc/loadavg readings and clock: `running` is read at each sample."""

    def __init__(self) -> None:
        self.running: int | None = 0
        self.now = 100.0

    def cores(self, cpus: int) -> FreeCores:
        return FreeCores(cpus, read=lambda: self.running, clock=lambda: self.now)


def test_all_cores_are_free_before_any_sample() -> None:
    assert FakeLoad().cores(8).free() == 8


def test_a_process_that_keeps_a_core_busy_takes_it_at_the_next_step() -> None:
    load = FakeLoad()
    cores = load.cores(2)
    load.running = 2  # the decode thread and its worker, nothing else
    cores.sample(own_running=2)
    assert cores.free() == 2
    load.now += WINDOW_S * 2
    load.running = 3  # and one more, all the time
    cores.sample(own_running=2)
    assert cores.free() == 1


def test_a_process_that_runs_now_and_then_takes_no_core() -> None:
    load = FakeLoad()
    cores = load.cores(4)
    for step in range(20):  # busy at most steps, idle at one within the window
        load.now += 0.01
        load.running = 4 + (step % 5 != 0)
        cores.sample(own_running=4)
        assert cores.free() == 4


def test_a_core_given_back_is_taken_at_the_next_step_and_one_is_always_left() -> None:
    load = FakeLoad()
    cores = load.cores(2)
    load.running = 9  # more busy processes than cores: still one thread
    cores.sample(own_running=1)
    assert cores.free() == 1
    load.now += 0.01
    load.running = 1  # only the decode thread
    cores.sample(own_running=1)
    assert cores.free() == 2


def test_the_fewest_over_the_window_count_as_a_plain_minimum_would() -> None:
    """The runner keeps only the samples that may still be the window's fewest; what it
    says is the minimum over every sample of the last WINDOW_S (or the last sample)."""
    shuffled = random.Random(7)
    load = FakeLoad()
    cores = load.cores(16)
    taken: list[tuple[float, int]] = []
    for _ in range(2000):
        load.now += shuffled.choice([0.001, 0.01, 0.05, 0.3])
        load.running = 4 + shuffled.randrange(12)
        cores.sample(own_running=4)
        taken.append((load.now, load.running - 4))
        window = [others for at, others in taken if load.now - at <= WINDOW_S]
        assert cores.free() == max(1, 16 - min(window))


def test_an_unreadable_count_changes_nothing() -> None:
    load = FakeLoad()
    cores = load.cores(2)
    load.running = 3
    cores.sample(own_running=1)
    load.running = None
    load.now += 1
    cores.sample(own_running=1)
    assert cores.free() == 1  # the last reading stands


def test_the_count_is_read_from_loadavg(tmp_path: Path) -> None:
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.52 0.58 0.59 3/1234 56789\n")
    assert read_running(loadavg) == 3
    loadavg.write_text("garbage\n")
    assert read_running(loadavg) is None
    assert read_running(tmp_path / "missing") is None
    loadavg.write_text("0.52 0.58 0.59 5/1234 56789\n")
    reader = LoadavgReader(loadavg)  # the file kept open, read again each time
    assert reader() == 5
    loadavg.write_text("0.52 0.58 0.59 7/1234 56789\n")
    assert reader() == 7
    if Path("/proc/loadavg").exists():  # this process is running: at least one
        running = read_running()
        assert running is not None and running >= 1


def test_a_process_held_to_some_cpus_keeps_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(free_cores, "read_running", lambda: 3)  # a fake /proc/loadavg
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert FreeCores.for_this_process() is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    found = FreeCores.for_this_process()
    assert found is not None and found.cpus == 64


@pytest.mark.parametrize(
    ("settings", "env", "yields"),
    [
        (WorkerSettings(), {}, True),
        (WorkerSettings(threads=2), {}, False),  # set by hand: kept
        (WorkerSettings(threads_batch=2), {}, False),
        (WorkerSettings(n_gpu_layers=99), {}, False),  # computed on a GPU
        (WorkerSettings(), {"DMR_FREE_CORES": "0"}, False),
        (WorkerSettings(), {"DMR_CPU_SHARE": "false"}, False),
        (WorkerSettings(), {"DMR_FREE_CORES": "1"}, True),
    ],
)
def test_which_runners_yield_busy_cores(
    settings: WorkerSettings, env: dict[str, str], yields: bool
) -> None:
    assert yields_busy_cores(settings, env) is yields
