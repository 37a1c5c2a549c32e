"""A greedy request's tokens are read from the logits in place (runner/model.py
`greedy_token`), not through llama.cpp's sampler chain, which first copies every
logit into a candidate array: the same token as the chain's greedy sampler, ties
and all, and the chain again wherever the two could differ. The model is the real
SmolLM2, loaded in this process."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from dmr_llamacpp.runner.batching import BatchedGenerator
from dmr_llamacpp.runner.model import Batch, LoadedModel
from dmr_llamacpp.runner.sampling import SamplingParams, build_sampler_chain
from llamacpp_helpers import generated, greedy_params, slot_streams_model

pytestmark = pytest.mark.llama

PROMPT = "The three primary colours of light are"


@pytest.fixture(scope="module")
def model(llama_bundle: Path) -> Iterator[LoadedModel]:
    loaded = slot_streams_model(llama_bundle, slots=2, cells=256)
    yield loaded
    loaded.close()


def _decode_all_rows(model: LoadedModel, text: str) -> int:
    """Decode `text` into sequence 0 with logits for every row; the row count."""
    llama_cpp.llama_memory_seq_rm(model.memory, 0, 0, -1)
    tokens = model.tokenize(text, add_special=True)
    batch = Batch(64)
    for position, token in enumerate(tokens):
        batch.add(token, position, 0, wants_logits=True)
    assert batch.decode(model) == 0
    return len(tokens)


def _chain_token(model: LoadedModel, row: int) -> int:
    chain = build_sampler_chain(greedy_params(1), model.vocab, model.n_vocab)
    try:
        return int(llama_cpp.llama_sampler_sample(chain, model.ctx, row))
    finally:
        llama_cpp.llama_sampler_free(chain)


def _logits_in_place(model: LoadedModel, row: int) -> Any:
    """The context's own logits of `row`, writable: what both readers read."""
    pointer = llama_cpp.llama_get_logits_ith(model.ctx, row)
    return np.ctypeslib.as_array(pointer, shape=(model.n_vocab,))


@pytest.mark.parametrize(
    ("changes", "plain"),
    [
        ({}, True),
        ({"temperature": 0.7}, False),
        ({"grammar": 'root ::= "a"'}, False),
        ({"logit_bias": ((5, 0.0),)}, False),
        ({"repeat_penalty": 1.1}, False),
        ({"presence_penalty": 0.5}, False),
        ({"frequency_penalty": 0.5}, False),
        ({"top_k": 1, "top_p": 0.5, "min_p": 0.0, "seed": None, "max_tokens": 4}, True),
    ],
)
def test_plain_greedy_is_the_chain_of_greedy_alone(changes: dict[str, Any], plain: bool) -> None:
    params: SamplingParams = replace(greedy_params(8), **changes)
    assert params.plain_greedy is plain


def test_greedy_token_is_the_greedy_samplers_token_for_every_row(model: LoadedModel) -> None:
    rows = _decode_all_rows(model, PROMPT)
    assert rows > 4
    for row in range(rows):
        assert model.greedy_token(row) == _chain_token(model, row), row


def test_equal_highest_logits_give_the_first_as_the_chain_does(model: LoadedModel) -> None:
    rows = _decode_all_rows(model, PROMPT)
    logits = _logits_in_place(model, rows - 1)
    top = float(logits.max()) + 1.0
    logits[777] = top
    logits[123] = top
    assert model.greedy_token(rows - 1) == 123 == _chain_token(model, rows - 1)


def test_a_nan_among_the_highest_leaves_the_token_to_the_chain(model: LoadedModel) -> None:
    rows = _decode_all_rows(model, PROMPT)
    logits = _logits_in_place(model, rows - 1)
    logits[42] = math.nan
    assert model.greedy_token(rows - 1) is None


def test_an_output_without_logits_leaves_the_token_to_the_chain(model: LoadedModel) -> None:
    llama_cpp.llama_memory_seq_rm(model.memory, 0, 0, -1)
    batch = Batch(8)
    for position, token in enumerate(model.tokenize(PROMPT, add_special=True)[:4]):
        batch.add(token, position, 0, wants_logits=position == 3)
    assert batch.decode(model) == 0
    assert model.greedy_token(0) is None  # row 0 asked for no logits
    assert model.greedy_token(3) is not None


async def _answer(generator: BatchedGenerator, params: SamplingParams) -> str:
    return (await generated(generator, PROMPT, params))[0]


def test_the_decode_loop_reads_greedy_tokens_without_the_chain(
    model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    chain_sample = llama_cpp.llama_sampler_sample

    def counted(sampler: Any, ctx: Any, index: int) -> int:
        calls.append(index)
        return int(chain_sample(sampler, ctx, index))

    monkeypatch.setattr(llama_cpp, "llama_sampler_sample", counted)
    llama_cpp.llama_memory_clear(model.memory, True)
    generator = BatchedGenerator(model, n_parallel=2, ctx_per_slot=256)
    try:
        plain = asyncio.run(_answer(generator, replace(greedy_params(24), cache_prompt=False)))
        assert calls == []
        # A zero bias changes no logit but puts a sampler before `greedy`: the chain.
        chained = replace(greedy_params(24), cache_prompt=False, logit_bias=((5, 0.0),))
        assert asyncio.run(_answer(generator, chained)) == plain
        assert len(calls) == 24
    finally:
        generator.close()
        llama_cpp.llama_memory_clear(model.memory, True)
    assert plain.strip()
