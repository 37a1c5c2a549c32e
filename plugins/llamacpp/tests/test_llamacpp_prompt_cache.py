"""Prompt caching: a slot keeps its KV cells after a request, and the next request
that shares their prefix decodes only the rest (as llama-server does)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dmr_llamacpp.runner.batching import common_prefix_length
from dmr_llamacpp.runner.row_kinds import repeat_tail
from llamacpp_helpers import RunnerProcess, make_launch, short_socket

pytestmark = pytest.mark.llama

N_UBATCH = 512  # the runner's default micro-batch


def reused(prompt_tokens: int) -> int:
    """The cached tokens of a greedy request repeating a prompt (row_kinds.py)."""
    return prompt_tokens - repeat_tail(prompt_tokens, N_UBATCH)


def chat(
    runner: RunnerProcess, messages: list[dict[str, str]], max_tokens: int = 12, **extra: Any
) -> Any:
    with runner.client() as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra},
        )
    assert answer.status_code == 200, answer.text
    return answer.json()


def first_token_logprobs(
    runner: RunnerProcess, messages: list[dict[str, str]], **extra: Any
) -> Any:
    """The answer's first token and the log-probabilities of the top five candidates."""
    body = chat(runner, messages, max_tokens=1, logprobs=True, top_logprobs=5, **extra)
    entry = body["choices"][0]["logprobs"]["content"][0]
    top = {item["token"]: item["logprob"] for item in entry["top_logprobs"]}
    return body, top


def assert_same_logits(fresh: dict[str, float], reused: dict[str, float]) -> None:
    """Reused cells give the logits a fresh prefill gives, up to float rounding (answers
    are not compared: a different batch shape can tip a near-tie in greedy decoding)."""
    shared = set(fresh) & set(reused)
    assert len(shared) >= 4, (fresh, reused)
    assert all(abs(fresh[token] - reused[token]) < 0.05 for token in shared), (fresh, reused)


def cached(body: dict[str, Any]) -> int:
    return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


def conversation(topic: str) -> list[dict[str, str]]:
    # A unique system prompt first: nothing cached so far can share more than its frame.
    return [
        {"role": "system", "content": f"Session {uuid.uuid4().hex}. You are terse."},
        {"role": "user", "content": f"Tell me one fact about {topic}."},
    ]


def test_common_prefix_length() -> None:
    assert common_prefix_length([], [1, 2]) == 0
    assert common_prefix_length([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix_length([1, 2, 3], [1, 2]) == 2
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix_length([5], [6]) == 0
    long = list(range(5000))
    assert common_prefix_length(long, [*long[:4321], -1]) == 4321


def test_repeated_prompt_decodes_only_its_last_tokens(completion_runner: RunnerProcess) -> None:
    messages = conversation("owls")
    first, fresh = first_token_logprobs(completion_runner, messages)
    again, reused = first_token_logprobs(completion_runner, messages)
    prompt = first["usage"]["prompt_tokens"]
    assert cached(first) < prompt // 2  # only the template's frame could have been cached
    # All but the last prompt tokens come from the cache: the last one, whose logits pick
    # the first token, and those that make them a cold prefill's (greedy: row_kinds.py).
    tail = repeat_tail(prompt, N_UBATCH)
    assert cached(again) == prompt - tail
    assert again["timings"]["prompt_n"] == tail and again["timings"]["cache_n"] == prompt - tail
    assert_same_logits(fresh, reused)


def long_conversation(topic: str) -> list[dict[str, str]]:
    """About 900 tokens: past the 512 cells from which one row alone rounds otherwise."""
    notes = " ".join(
        f"Note {index}: the {topic} survey counted {index * 7 % 31} nests." for index in range(60)
    )
    return [
        {"role": "system", "content": f"Session {uuid.uuid4().hex}. You are terse."},
        {"role": "user", "content": f"{notes}\nWhich count appears most often?"},
    ]


@pytest.fixture
def long_runner(llama_bundle: Path) -> Iterator[RunnerProcess]:
    """Two slots of 2,048 tokens."""
    runner = RunnerProcess(
        make_launch(llama_bundle, short_socket("long"), context_size=2048, parallel=2)
    )
    yield runner
    runner.stop()


def test_a_greedy_prompt_gets_a_cold_prefills_logits_from_the_cache(
    long_runner: RunnerProcess,
) -> None:
    """Bit for bit: first seen (the template's frame may be cached from another prompt),
    decoded whole (`cache_prompt: false`), and asked again (all but its last rows from
    the cache). Decoding only the last token again moved logits by up to 0.5 here."""
    chat(long_runner, conversation("gulls"), max_tokens=2)  # caches the template's frame
    messages = long_conversation("heron")
    first, seen = first_token_logprobs(long_runner, messages)
    prompt = first["usage"]["prompt_tokens"]
    assert prompt > 600
    _, cold = first_token_logprobs(long_runner, messages, cache_prompt=False)
    again, reused = first_token_logprobs(long_runner, messages)
    assert seen == cold
    assert reused == cold
    assert cached(again) == prompt - repeat_tail(prompt, N_UBATCH) > 0


def test_multi_turn_reuses_the_conversation_so_far(completion_runner: RunnerProcess) -> None:
    messages = conversation("rivers")
    first = chat(completion_runner, messages, max_tokens=16)
    messages += [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And one about lakes?"},
    ]
    # Sampled: a greedy follow-up whose cached part is 64 tokens or fewer may be
    # decoded whole, for a cold prefill's logits (row_kinds.py), which made this
    # test pass or fail by the kinds of the rows earlier tests had left in the slot.
    second = chat(completion_runner, messages, temperature=0.7)
    # The whole first prompt is a prefix of the second, and it stayed in the slot.
    assert cached(second) >= first["usage"]["prompt_tokens"]
    assert cached(second) < second["usage"]["prompt_tokens"]


def test_interleaved_conversations_keep_their_own_slots(completion_runner: RunnerProcess) -> None:
    first_a = conversation("volcanoes")
    first_b = conversation("glaciers")
    a1 = chat(completion_runner, first_a)
    b1 = chat(completion_runner, first_b)
    # B went to another slot (LRU), so A's cache survived B's request, and B's survives A's.
    # (Sampled follow-ups: a greedy one past 64 tokens decodes its short history again,
    # whose rows a cold prefill computes with other kernels; row_kinds.py.)
    a2 = chat(
        completion_runner,
        [*first_a, {"role": "assistant", "content": "Hot."}, {"role": "user", "content": "More?"}],
        temperature=0.7,
    )
    b2 = chat(
        completion_runner,
        [*first_b, {"role": "assistant", "content": "Cold."}, {"role": "user", "content": "More?"}],
        temperature=0.7,
    )
    assert cached(a2) >= a1["usage"]["prompt_tokens"] - 1 - 4
    assert cached(b2) >= b1["usage"]["prompt_tokens"] - 1 - 4


def test_a_prompt_whose_slot_was_taken_comes_back_from_host_memory(
    completion_runner: RunnerProcess,
) -> None:
    """Nine conversations on eight slots: the first one's cells are saved to host
    memory when its slot is taken, and copied back when it is asked again."""
    first = conversation("comets")
    _, fresh = first_token_logprobs(completion_runner, first)
    for topic in ("a", "b", "c", "d", "e", "f", "g", "h"):
        chat(completion_runner, conversation(f"the letter {topic}"), max_tokens=2)
    again, restored = first_token_logprobs(completion_runner, first)
    assert cached(again) == reused(again["usage"]["prompt_tokens"])
    assert_same_logits(fresh, restored)


def test_cache_prompt_false_decodes_the_whole_prompt(completion_runner: RunnerProcess) -> None:
    """llama-server's `cache_prompt: false`: the answer cannot depend on earlier requests."""
    messages = conversation("glaciers")
    chat(completion_runner, messages)
    again = chat(completion_runner, messages, cache_prompt=False)
    assert cached(again) == 0
    assert again["timings"]["prompt_n"] == again["usage"]["prompt_tokens"]
    # It did not take the slot it would have matched: that cache is still there.
    third = chat(completion_runner, messages)
    assert cached(third) == reused(third["usage"]["prompt_tokens"])


def test_cache_prompt_must_be_a_boolean(completion_runner: RunnerProcess) -> None:
    with completion_runner.client() as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"messages": conversation("moss"), "max_tokens": 2, "cache_prompt": "no"},
        )
    assert answer.status_code == 400
    assert "cache_prompt" in answer.json()["error"]["message"]


@pytest.fixture
def fresh_runner(llama_bundle: Path) -> Iterator[RunnerProcess]:
    """A runner of its own: nothing in its slots or its host memory yet."""
    runner = RunnerProcess(make_launch(llama_bundle, short_socket("fresh"), parallel=2))
    yield runner
    runner.stop()


def host_cache(runner: RunnerProcess) -> tuple[int, int]:
    """The `llamacpp:host_cache_prompts` and `_bytes` gauges."""
    with runner.client() as client:
        text = client.get("/metrics").text
    values = [
        re.search(rf"^llamacpp:host_cache_{name} ([0-9.e+-]+)$", text, re.MULTILINE)
        for name in ("prompts", "bytes")
    ]
    assert all(values), text
    prompts, size = (float(value.group(1)) for value in values if value)
    return int(prompts), int(size)


def wait_for_host_prompts(runner: RunnerProcess, count: int) -> None:
    """Wait (up to 30 s) until host memory holds `count` prompts: the idle copy comes
    50 ms after the runner's last request."""
    deadline = time.monotonic() + 30
    while host_cache(runner)[0] < count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host_cache(runner)[0] >= count


def test_an_idle_runner_copies_its_slots_to_host_memory(fresh_runner: RunnerProcess) -> None:
    """A finished conversation's cells are copied to host memory once the runner is
    idle, before any request takes the slot: a burst that takes it later does not wait
    for the copy. Copied back, they give the logits a fresh prefill gives."""
    assert host_cache(fresh_runner) == (0, 0)
    first = conversation("volcanoes")
    _, fresh = first_token_logprobs(fresh_runner, first)
    wait_for_host_prompts(fresh_runner, 1)
    prompts, size = host_cache(fresh_runner)
    assert prompts == 1 and size > 0
    # Both slots taken by other prompts: the first comes back from host memory.
    for topic in ("rivers", "deserts"):
        chat(fresh_runner, conversation(topic), max_tokens=2)
    again, restored = first_token_logprobs(fresh_runner, first)
    assert cached(again) == reused(again["usage"]["prompt_tokens"])
    assert_same_logits(fresh, restored)


@pytest.fixture
def one_slot_runner(llama_bundle: Path) -> Iterator[RunnerProcess]:
    """One slot: every prompt takes the cells of the one before."""
    runner = RunnerProcess(make_launch(llama_bundle, short_socket("one-slot"), parallel=1))
    yield runner
    runner.stop()


def test_a_saved_prompt_copied_back_for_a_part_of_it_stays_saved_whole(
    one_slot_runner: RunnerProcess,
) -> None:
    """A request that shares only the start of a saved prompt has that prompt copied
    into its slot and keeps the start; the saved copy must stay, or the rest of its
    cells is lost (cut in the slot, gone from host memory): asked again, it decoded
    all but the shared start (seen in CI as 6 cached tokens of 57)."""
    first = conversation("comets")
    _, fresh = first_token_logprobs(one_slot_runner, first)
    wait_for_host_prompts(one_slot_runner, 1)
    # Another conversation takes the slot; then one with the first's system prompt
    # copies the first's cells back for that shared start.
    chat(one_slot_runner, conversation("rivers"), max_tokens=2)
    sibling = [first[0], {"role": "user", "content": "Name a desert."}]
    shared_start = chat(one_slot_runner, sibling, max_tokens=2)
    assert cached(shared_start) > 10  # the system prompt came from host memory
    again, restored = first_token_logprobs(one_slot_runner, first)
    assert cached(again) == reused(again["usage"]["prompt_tokens"])
    assert_same_logits(fresh, restored)
