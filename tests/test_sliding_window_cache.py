"""Prompt caches of a sliding-window model (Gemma 2 and 3, gpt-oss, ...), through a
real `dmr serve` and the real llama.cpp runner (docs/scheduler.md, "Prompt caches
across reloads").

Such a model's copy of a sequence (what the host cache and the files under the store
hold) keeps only the cells inside the window of its last position. So a copy can
serve its own length, never a prefix reaching further back: cut back that far, the
rest was decoded without the cells it attends to, and the answer silently changed.
And the kept cells come back in another layout than they had, which the kernels sum
in another order. The runner now checks the reach of every cache it would reuse, and
copies each long prompt before its last micro-batch and goes on over that copy, so
that the prompt asked again, after an unload too, gets its cold answer bit for bit.

The model is a fake: a small Gemma 3 with random weights, a window of 64 tokens and
SmolLM2's tokenizer and chat template, written by `bench/random_gguf.py` (no
sliding-window GGUF fits in the package index). Random weights never end a turn, so
every answer runs to its token limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dmr_llamacpp.runner.row_kinds import repeat_tail

from bench.random_gguf import write_model
from tests.fixtures.random_weights import cached_random_gguf, serving
from tests.fixtures.server import DmrServer

pytestmark = pytest.mark.llama

# The name says what it is: random weights, not a model anyone trained.
TAG = "test/random-weights-gemma3-window64:latest"
FILENAME = "random-weights-gemma3-e256-l6-window64.q8_0.gguf"
WINDOW = 64
SHAPE = {
    "embedding_length": 256,
    "block_count": 6,  # Gemma 3: five sliding-window layers, then a global one
    "attention.head_count": 4,
    "attention.head_count_kv": 1,
    "feed_forward_length": 512,
    "context_length": 8192,
}
CHAT = "/engines/v1/chat/completions"
N_UBATCH = 512  # the runner's default micro-batch
ANSWER = 16


def ensure_random_gemma3_gguf() -> Path:
    """The cached GGUF (about 20 MiB), written once."""
    return cached_random_gguf(
        FILENAME,
        lambda vocab, path: write_model(
            vocab,
            path,
            weights="q8_0",
            overrides=SHAPE,
            name="random weights, Gemma 3, window 64 (SmolLM2 tokenizer)",
            arch="gemma3",
            head_size=64,
            sliding_window=WINDOW,
        ),
    )


@pytest.fixture
def gemma3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DmrServer]:
    """A server of its own per test: what its unload saves is all the next runner reads."""
    tmp = tmp_path_factory.mktemp("dmr-sliding-window")
    with serving(tmp, ensure_random_gemma3_gguf(), TAG) as server:
        yield server


def document(topic: str, sentences: int) -> str:
    """About 14 tokens per sentence."""
    return " ".join(
        f"{topic} note {index}: crate {index * 7 % 101} waits at gate {index % 13}."
        for index in range(sentences)
    )


def chat(server: DmrServer, system: str, user: str, *, cache: bool = True) -> dict[str, Any]:
    body = {
        "model": TAG,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": ANSWER,
        "temperature": 0,
        "cache_prompt": cache,
    }
    with server.client(timeout=300) as client:
        answer = client.post(CHAT, json=body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    assert result["usage"]["completion_tokens"] == ANSWER
    return result


def text(result: dict[str, Any]) -> str:
    content: str = result["choices"][0]["message"]["content"]
    return content


def cached(result: dict[str, Any]) -> int:
    details = result["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def unload(server: DmrServer) -> None:
    """Stop the runner: it writes its prompt caches under the store as it stops."""
    with server.client(timeout=120) as client:
        assert client.post("/engines/unload", json={"models": [TAG]}).status_code == 200


def test_the_model_has_a_sliding_window() -> None:
    """The fake is what the other tests need: a window far shorter than the prompts."""
    from dmr_llamacpp.runner.model import ContextOptions, LoadedModel

    options = ContextOptions(
        n_ctx=1024, n_batch=512, n_ubatch=512, n_seq_max=1, threads=1, threads_batch=1
    )
    model = LoadedModel(ensure_random_gemma3_gguf(), options)
    try:
        assert model.n_swa == WINDOW
    finally:
        model.close()


def test_a_long_prompt_asked_again_after_an_unload_gets_its_cold_answer_from_the_cache(
    gemma3_server: DmrServer,
) -> None:
    system = "You keep the depot's records."
    user = document("Depot", 48) + "\n\nWhich gate is busiest?"
    cold = chat(gemma3_server, system, user)
    prompt_tokens = cold["usage"]["prompt_tokens"]
    assert N_UBATCH + WINDOW < prompt_tokens < 2 * N_UBATCH
    # What a greedy repeat decodes again for a cold prefill's logits (row_kinds.py).
    reused = prompt_tokens - repeat_tail(prompt_tokens, N_UBATCH)
    warm = chat(gemma3_server, system, user)
    assert text(warm) == text(cold)
    unload(gemma3_server)
    reloaded = chat(gemma3_server, system, user)
    # Greedy over random weights: any other cell, layout or rounding changes the text.
    assert text(reloaded) == text(cold)
    # From the copy the runner made before those rows: the copy after the answer holds
    # only the window of the answer's end, which the prompt cannot use.
    assert cached(warm) == cached(reloaded) == reused


def test_a_restored_cache_is_not_cut_back_past_its_window(gemma3_server: DmrServer) -> None:
    """Two prompts sharing a long system message: after an unload the first one's
    cells come back as a copy, which cannot serve the shared prefix alone."""
    system = "You keep the harbour's records. " + document("Harbour", 28)
    first = document("Quay", 16) + "\n\nWhich crate waits longest?"
    second = document("Dock", 16) + "\n\nWhich gate is emptiest?"
    assert chat(gemma3_server, system, first)["usage"]["prompt_tokens"] > N_UBATCH
    # A third prompt, whose copies end well past the shared prefix too. (Not a short
    # one: "Hello." was copied 64 tokens before its end, exactly where the prefix ends,
    # and a copy that reaches the prefix is reused as its own prompt's rows, which
    # are not bit for bit another prompt's cold prefill: docs/scheduler.md.)
    third = document("Bay", 6) + "\n\nWhich gate is fullest?"
    assert chat(gemma3_server, system, third)["usage"]["prompt_tokens"] > 4 * WINDOW
    unload(gemma3_server)
    warm = chat(gemma3_server, system, second)
    cold = chat(gemma3_server, system, second, cache=False)
    assert cached(cold) == 0
    # No copy's window reaches back to the shared prefix: none is cut back to it, and
    # the answer is the cold one.
    assert cached(warm) == 0
    assert text(warm) == text(cold)
