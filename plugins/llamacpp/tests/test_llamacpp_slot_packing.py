"""Requests go to the first slots the limit opens (runner/batching.py `_pick_slot`):
llama.cpp's attention spans every KV stream from a batch's lowest sequence id to its
highest, so eight sequences spread over 32 streams cost SmolLM2 47 ms a step against
28 ms packed in eight (bench/decode_batch_cost.py). The decode loop runs in this
process here, on the real model, so the slots each request took can be read."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from dmr_llamacpp.runner import batching, burst
from dmr_llamacpp.runner.batching import BatchedGenerator, Failed, Finished, GenerationJob
from llamacpp_helpers import greedy_params, slot_streams_model

pytestmark = pytest.mark.llama

SLOTS = 16
CELLS = 256
PARAMS = greedy_params(6)


@pytest.fixture(scope="module")
def generator(llama_bundle: Path) -> Iterator[BatchedGenerator]:
    model = slot_streams_model(llama_bundle, SLOTS, CELLS)
    generator = BatchedGenerator(model, n_parallel=SLOTS, ctx_per_slot=CELLS, adaptive_slots=True)
    yield generator
    generator.close()
    model.close()


async def answer(generator: BatchedGenerator, text: str, slots_seen: set[int]) -> None:
    job = GenerationJob(generator.model.tokenize(text, add_special=True), PARAMS)
    generator.submit(job)
    while True:
        event = await job.events.get()
        slots_seen.update(slot.seq_id for slot in generator.slots if slot.job is job)
        if isinstance(event, Failed):
            raise AssertionError(event)
        if isinstance(event, Finished):
            return


async def test_requests_take_the_first_slots_the_limit_opens(
    generator: BatchedGenerator,
) -> None:
    everywhere: set[int] = set()
    generator.slot_limit.limit = SLOTS  # a wave of sixteen while all slots were open
    await asyncio.gather(
        *(answer(generator, f"Wave one, line {i}.", everywhere) for i in range(16))
    )
    assert everywhere == set(range(SLOTS))
    # The limit stepped back to eight. The slots beyond it were used least recently,
    # so the least-recently-used rule alone would hand them out first.
    for slot in generator.slots:
        slot.last_used = slot.seq_id if slot.seq_id >= 8 else 1000.0 + slot.seq_id
    generator.slot_limit.limit = 8
    packed: set[int] = set()
    await asyncio.gather(*(answer(generator, f"Wave two, line {i}.", packed) for i in range(8)))
    assert packed == set(range(8))


async def test_a_burst_is_collected_up_to_the_open_slots_only(
    generator: BatchedGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An idle runner collects a burst of requests before its first step, until it has
    # one for every slot it may fill or the gap after the last one runs out. With 16
    # slots and 8 open, a burst of 8 used to wait out that gap (25 ms) for requests
    # that would have had no slot to go to.
    limits: list[int] = []
    collect = burst.collect_burst

    def recording(*args: object, limit: int, **kwargs: object) -> object:
        limits.append(limit)
        return collect(*args, limit=limit, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(batching, "collect_burst", recording)  # the name batching calls
    generator.slot_limit.limit = 8
    await asyncio.gather(*(answer(generator, f"Burst, line {i}.", set()) for i in range(8)))
    assert limits and limits[0] == 8, limits
