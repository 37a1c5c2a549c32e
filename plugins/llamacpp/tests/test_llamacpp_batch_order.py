"""Every decode step is one pass over the weights (runner/batching.py `_build_and_decode`).

llama.cpp splits a batch over per-slot KV streams into ubatches of consecutive,
increasing sequence ids only (`llama_batch_allocr::split_equal`), each a pass over
the weights. A batch whose ids came in arrival order (0, 1, 4, 7, 3, 2, 6, 5) ran as
five passes, one with a gap (0-2, 4-7) as two: the 0.6B model's first step of a
burst took 144 ms against 69 (docs/benchmarks.md). The runner now adds its tokens
in id order and gives each idle slot in a gap one throwaway token, taken out again
after the step. The decode loop runs in this process, on the real model, and every
batch it decodes is recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest
from dmr_llamacpp.runner.batching import BatchedGenerator
from dmr_llamacpp.runner.model import Batch, LoadedModel
from llamacpp_helpers import generated, greedy_params, slot_streams_model

pytestmark = pytest.mark.llama

SLOTS = 8
CELLS = 256
PROMPTS = [f"Line {i}: the weather in town number {i} today is" for i in range(6)]


class RecordingBatch(Batch):
    """A `Batch` that keeps the sequence id of every token of every decode."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.decoded: list[list[int]] = []

    def decode(self, model: LoadedModel) -> int:
        self.decoded.append([self.raw.seq_id[i][0] for i in range(self.n_tokens)])
        return super().decode(model)


@pytest.fixture(scope="module")
def generator(llama_bundle: Path) -> Iterator[BatchedGenerator]:
    model = slot_streams_model(llama_bundle, SLOTS, CELLS)
    generator = BatchedGenerator(model, n_parallel=SLOTS, ctx_per_slot=CELLS)
    generator._batch = RecordingBatch(model.options.n_batch)
    yield generator
    generator.close()
    model.close()


def recorded(generator: BatchedGenerator) -> list[list[int]]:
    batch = generator._batch
    assert isinstance(batch, RecordingBatch)
    return batch.decoded


def one_pass(ids: list[int]) -> bool:
    """The ids of a batch, in order, as llama.cpp takes them in a single ubatch: each
    sequence's tokens together, the sequences consecutive and increasing."""
    runs = [seq for index, seq in enumerate(ids) if index == 0 or ids[index - 1] != seq]
    return runs == list(range(runs[0], runs[0] + len(runs)))


async def answer(generator: BatchedGenerator, text: str, max_tokens: int) -> tuple[str, int]:
    """The answer's tokens as text, and the prompt tokens taken from the slot's cache."""
    answered, finished = await generated(generator, text, greedy_params(max_tokens))
    return answered, finished.cached_tokens


async def test_a_burst_in_slots_taken_out_of_order_decodes_in_one_pass(
    generator: BatchedGenerator,
) -> None:
    await asyncio.gather(*(answer(generator, p, 4) for p in PROMPTS))
    recorded(generator).clear()
    # The same prompts again, last one first: each goes back to the slot that caches it,
    # so the slots arrive in falling order.
    again = await asyncio.gather(*(answer(generator, p, 4) for p in reversed(PROMPTS)))
    assert all(text and cached > 0 for text, cached in again)
    steps = recorded(generator)
    assert len(steps) >= 4
    assert all(one_pass(ids) for ids in steps), steps


async def test_idle_slots_between_busy_ones_keep_a_step_in_one_pass(
    generator: BatchedGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    filled: list[dict[int, int]] = []
    drop = generator._drop_fillers

    def record_and_drop() -> None:
        if generator._filled:
            filled.append(dict(generator._filled))
        drop()

    monkeypatch.setattr(generator, "_drop_fillers", record_and_drop)
    recorded(generator).clear()
    # Short answers in two slots, long ones in the others: once the short ones end,
    # the long ones' slots have idle slots between them.
    lengths = [2, 12, 2, 12]
    await asyncio.gather(
        *(answer(generator, p, n) for p, n in zip(PROMPTS[:4], lengths, strict=True))
    )
    steps = recorded(generator)
    assert all(one_pass(ids) for ids in steps), steps
    assert filled, steps  # a gap was filled
    # Each throwaway token was taken out again: every slot's cells end where its
    # tokens do, so a later request reuses exactly what the slot says it holds.
    memory = generator.model.memory
    for slot in generator.slots:
        assert llama_cpp.llama_memory_seq_pos_max(memory, slot.seq_id) == len(slot.tokens) - 1
    for prompt in PROMPTS[:4]:
        text, cached = await answer(generator, prompt, 3)
        assert text and cached > 0
