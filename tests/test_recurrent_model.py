"""A recurrent model answers every request, not only the first one in a slot.

Recurrent and hybrid models (Mamba, Granite 4.0 H, LFM2, ...) keep one state per
sequence instead of a KV cell per token. llama.cpp can drop that state whole but
not cut it back to a shared prefix, and the runner used to ignore the refusal:
the next request in the slot decoded on from the prefix and failed with
"decode failed: llama_decode=-1". Now such a cache is never reused (the runner's
`LoadedModel.can_cut_cache`).

The model is a fake: a small Mamba with random weights and SmolLM2's tokenizer and
chat template, written by `bench/random_gguf.py` (no recurrent GGUF fits in the
package index). Random weights never end a turn, so requests set a token limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from dmr.sample_model import ensure_smollm2_gguf

from bench.random_gguf import write_mamba
from tests.fixtures.random_weights import cached_random_gguf, serving
from tests.fixtures.server import DmrServer

pytestmark = pytest.mark.llama

# The name says what it is: random weights, not a model anyone trained.
TAG = "test/random-weights-mamba:latest"
FILENAME = "random-weights-mamba-e256-l4.gguf"
LIMIT = 12


def ensure_random_mamba_gguf() -> Path:
    """The cached GGUF (21 MiB), written once."""
    return cached_random_gguf(
        FILENAME,
        lambda vocab, path: write_mamba(
            vocab, path, embedding=256, layers=4, name="random weights, Mamba"
        ),
    )


@pytest.fixture(scope="module")
def mamba_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DmrServer]:
    with serving(tmp_path_factory.mktemp("dmr-mamba"), ensure_random_mamba_gguf(), TAG) as server:
        yield server


def chat(client: openai.OpenAI, text: str) -> tuple[str, int]:
    """The greedy answer's text and the prompt tokens the runner took from its cache."""
    answer = client.chat.completions.create(
        model=TAG,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text},
        ],
        max_tokens=LIMIT,
        temperature=0,
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == LIMIT
    details = answer.usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None else 0
    return answer.choices[0].message.content or "", cached or 0


def test_a_recurrent_model_answers_again_in_the_same_slot(mamba_server: DmrServer) -> None:
    # No retries: the SDK retries a 500 twice, and the retry of a failed request found
    # its slot reset and passed.
    client = openai.OpenAI(base_url=f"{mamba_server.url}/engines/v1", api_key="none", max_retries=0)
    first, _ = chat(client, "Tell me about the sea.")
    # The same prompt and one that shares its system message: before the fix both
    # failed with a 500, their prefix cut from a state that cannot be cut.
    again, cached = chat(client, "Tell me about the sea.")
    other, _ = chat(client, "Tell me about the mountains.")
    other_again, _ = chat(client, "Tell me about the mountains.")
    assert first and other
    # Greedy answers from a state decoded afresh every time: the same text.
    assert again == first
    assert other_again == other
    assert cached == 0


def test_a_recurrent_model_refuses_a_draft_model_with_a_clear_error() -> None:
    """Speculative decoding cuts rejected draft tokens from the cache after every step,
    which a recurrent model's cache cannot do: the load fails, saying so."""
    from dmr_llamacpp.runner.__main__ import load_drafter
    from dmr_llamacpp.runner.model import ContextOptions, LoadedModel
    from dmr_llamacpp.settings import WorkerSettings

    options = ContextOptions(
        n_ctx=512, n_batch=512, n_ubatch=512, n_seq_max=1, threads=1, threads_batch=1
    )
    model = LoadedModel(ensure_random_mamba_gguf(), options)
    try:
        assert not model.can_cut_cache
        with pytest.raises(ValueError, match="recurrent or hybrid"):
            load_drafter(ensure_smollm2_gguf(), model, options, WorkerSettings())
    finally:
        model.close()
