"""The sampler chain's penalties start from the prompt's last `repeat_last_n` tokens
(runner/sampling.py), checked on llama.cpp's own penalty sampler without a model."""

from __future__ import annotations

import ctypes
from dataclasses import replace

import llama_cpp
import pytest
from dmr_llamacpp.runner.sampling import _penalties
from llamacpp_helpers import greedy_params

N_VOCAB = 16


def _penalised(history: list[int], repeat_last_n: int) -> set[int]:
    """The tokens whose logit the penalty sampler lowered, all logits starting at 1."""
    params = replace(greedy_params(8), repeat_penalty=2.0, repeat_last_n=repeat_last_n)
    sampler = _penalties(params, N_VOCAB, history, n_ctx=8)
    try:
        data = (llama_cpp.llama_token_data * N_VOCAB)(
            *(llama_cpp.llama_token_data(token, 1.0, 0.0) for token in range(N_VOCAB))
        )
        candidates = llama_cpp.llama_token_data_array(data, N_VOCAB, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return {item.id for item in data if item.logit < 1.0}
    finally:
        llama_cpp.llama_sampler_free(sampler)


@pytest.mark.parametrize(
    ("history", "repeat_last_n", "penalised"),
    [
        ([1, 2, 3, 4, 5], 8, {1, 2, 3, 4, 5}),  # a prompt shorter than the window: all of it
        ([1, 2, 3, 4, 5], 2, {4, 5}),  # a longer one: its last tokens only
        ([1, -7, 2], 64, {1, 2}),  # image placeholders are no tokens
        ([1, 2, 3], 0, set()),  # 0: no penalty
        (list(range(10)), -1, set(range(2, 10))),  # -1: the context (8 here)
    ],
)
def test_penalties_start_from_the_prompts_last_tokens(
    history: list[int], repeat_last_n: int, penalised: set[int]
) -> None:
    assert _penalised(history, repeat_last_n) == penalised
