"""An idle decode loop starts a job the server saw come alone (`GenerationJob.lone`,
the `x-dmr-lone` header) at once, and waits the burst gap for any other: the real
SmolLM2 model in-process, with the gap (and the burst window that bounds it) scaled up
to 1.5 s so a loaded machine cannot blur the difference."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dmr_llamacpp.runner import batching, burst
from dmr_llamacpp.runner.batching import BatchedGenerator, Failed, Finished, GenerationJob
from llamacpp_helpers import greedy_params, slot_streams_model

pytestmark = pytest.mark.llama

GAP_S = 1.5


@pytest.fixture(scope="module")
def generator(llama_bundle: Path) -> Iterator[BatchedGenerator]:
    model = slot_streams_model(llama_bundle, 2, 512)
    generator = BatchedGenerator(model, n_parallel=2, ctx_per_slot=512, burst_gap_s=GAP_S)
    yield generator
    generator.close()
    model.close()


@pytest.fixture(autouse=True)
def long_burst_window(monkeypatch: pytest.MonkeyPatch) -> None:
    collect = burst.collect_burst

    def collect_longer(*args: object, **kwargs: object) -> object:
        return collect(*args, **kwargs, window_s=2 * GAP_S)  # type: ignore[arg-type]

    monkeypatch.setattr(batching, "collect_burst", collect_longer)  # the name batching calls


async def seconds_to_first_event(generator: BatchedGenerator, *, lone: bool) -> float:
    tokens = generator.model.tokenize("Name a colour.", add_special=True)
    job = GenerationJob(tokens, greedy_params(2), lone=lone)
    started = time.perf_counter()
    generator.submit(job)
    first = await job.events.get()
    took = time.perf_counter() - started
    event = first
    while not isinstance(event, Finished):  # the slot is free again for the next test
        assert not isinstance(event, Failed), event
        event = await job.events.get()
    return took


async def test_a_lone_job_starts_without_the_burst_gap(generator: BatchedGenerator) -> None:
    before = generator.stats.lone_starts_total
    assert await seconds_to_first_event(generator, lone=True) < GAP_S * 2 / 3
    assert generator.stats.lone_starts_total == before + 1


async def test_any_other_job_waits_for_a_burst(generator: BatchedGenerator) -> None:
    before = generator.stats.lone_starts_total
    assert await seconds_to_first_event(generator, lone=False) >= GAP_S * 0.95
    assert generator.stats.lone_starts_total == before
