"""Interactive first: batch requests (`x-dmr-priority: batch`) give their slot to an
interactive request at the next decode step and resume later with the same answer
(docs/batch.md, "Interactive first"). A real runner with two slots on SmolLM2."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from dmr.runner_support import BATCH_PRIORITY, PRIORITY_HEADER
from dmr.scheduler.wait_queue import Priority, priority_headers, request_priority
from dmr_llamacpp.settings import WorkerSettings, apply_flags
from llamacpp_helpers import RunnerProcess, make_launch, short_socket

pytestmark = pytest.mark.llama

BATCH = {PRIORITY_HEADER: BATCH_PRIORITY}
# Long enough that a batch request is still generating when the chat comes.
BATCH_TOKENS = 160
# Generous: the wait ends as soon as the tokens are there.
WAIT_GENERATING_S = 300
PROMPTS = ("The history of the printing press", "A recipe for bread starts with")


@pytest.fixture(scope="module")
def two_slot_runner(llama_bundle: Path) -> Iterator[RunnerProcess]:
    runner = RunnerProcess(make_launch(llama_bundle, short_socket("priority"), parallel=2))
    yield runner
    runner.stop()


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, text
    return float(found.group(1))


async def metrics(client: httpx.AsyncClient) -> str:
    return (await client.get("/metrics")).text


async def batch_completion(client: httpx.AsyncClient, prompt: str) -> str:
    """A batch line's request: greedy, not streamed, long enough to be preempted."""
    body = {"prompt": prompt, "max_tokens": BATCH_TOKENS, "temperature": 0, "ignore_eos": True}
    answer = await client.post("/v1/completions", json=body, headers=BATCH)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert answer.json()["usage"]["completion_tokens"] == BATCH_TOKENS
    return str(choice["text"])


async def wait_generating(
    client: httpx.AsyncClient, slots: int, since: float, tokens: int, batch: list[asyncio.Task[Any]]
) -> None:
    """Until `slots` requests are in slots and have generated `tokens` each (about)
    since the `llamacpp:tokens_predicted_total` of `since`. Bounded by time, not by a
    count of polls: on a machine loaded by the other worker's tests (CI ran the Ray
    cluster beside it) the 80 tokens took longer than 1500 polls."""
    deadline = time.monotonic() + WAIT_GENERATING_S
    seen = "nothing"
    while time.monotonic() < deadline:
        for task in batch:
            if task.done():
                task.result()  # raises the request's own error, if it failed
                raise AssertionError("a batch request ended before the chat was sent")
        text = await metrics(client)
        done = metric(text, "llamacpp:tokens_predicted_total") - since
        processing = metric(text, "llamacpp:requests_processing")
        if processing == slots and done >= slots * tokens:
            return
        seen = f"{processing:g} in slots, {done:g} tokens"
        await asyncio.sleep(0.02)
    raise AssertionError(f"the requests never got that far in {WAIT_GENERATING_S} s: {seen}")


async def predicted(client: httpx.AsyncClient) -> float:
    return metric(await metrics(client), "llamacpp:tokens_predicted_total")


@dataclass
class Chat:
    first_token_steps: float  # decode steps from sending the chat to its first token
    tokens_per_step: float  # tokens generated per step while the chat streamed
    text: str


async def stream_chat(client: httpx.AsyncClient) -> Chat:
    """A streamed interactive chat, counted by the runner's metrics as it goes."""
    before = metric(await metrics(client), "llamacpp:decode_steps_total")
    body = {
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 24,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    counts: list[tuple[float, float]] = []  # (steps, tokens) at the 1st and 12th chunk
    chunks = 0
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                chunks += 1
                if chunks in (1, 12):
                    text_now = await metrics(client)
                    counts.append(
                        (
                            metric(text_now, "llamacpp:decode_steps_total"),
                            metric(text_now, "llamacpp:tokens_predicted_total"),
                        )
                    )
            text += delta or ""
    assert len(counts) == 2, f"the chat streamed {chunks} chunks"
    (steps0, tokens0), (steps1, tokens1) = counts
    return Chat(steps0 - before, (tokens1 - tokens0) / max(1.0, steps1 - steps0), text)


async def test_a_chat_takes_a_batch_slot_at_once_and_the_batch_answers_stay_the_same(
    two_slot_runner: RunnerProcess,
) -> None:
    # Step counts are asserted, not times: a machine loaded by other tests may take
    # minutes over the four 160-token answers (the client waits REQUEST_TIMEOUT_S).
    async with two_slot_runner.async_client() as client:
        alone = await asyncio.gather(*(batch_completion(client, p) for p in PROMPTS))
        preemptions = metric(await metrics(client), "llamacpp:preemptions_total")

        since = await predicted(client)
        batch = [asyncio.create_task(batch_completion(client, p)) for p in PROMPTS]
        # Far enough in that the cells to keep are worth a copy to host memory.
        await wait_generating(client, slots=2, since=since, tokens=40, batch=batch)
        chat = await stream_chat(client)
        # The chat ended while both batch requests still had tokens to go.
        assert not any(task.done() for task in batch)
        preempted = await asyncio.gather(*batch)
        after = metric(await metrics(client), "llamacpp:preemptions_total")

    assert chat.text
    # Admitted at the next step, not after a batch request's remaining ~120 tokens (the
    # count also takes in the steps run while the test reads it: 3 on an idle machine).
    assert chat.first_token_steps <= 10, chat
    # On CPU (batch share 0) the other batch request waited in its slot meanwhile: one
    # token a step, the chat's (with it decoded too, two).
    assert chat.tokens_per_step <= 1.3, chat
    assert after == preemptions + 1
    # Resumed where they stopped: the same greedy text, answered once each.
    assert preempted == alone


async def test_interactive_requests_are_never_preempted(two_slot_runner: RunnerProcess) -> None:
    """With both slots held by interactive requests, a third one waits its turn."""

    async def interactive(client: httpx.AsyncClient, prompt: str, tokens: int) -> Any:
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        answer = await client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()

    async with two_slot_runner.async_client() as client:
        before = metric(await metrics(client), "llamacpp:preemptions_total")
        since = await predicted(client)
        long = [asyncio.create_task(interactive(client, p, 48)) for p in PROMPTS]
        await wait_generating(client, slots=2, since=since, tokens=2, batch=long)
        await interactive(client, "Hello", 2)
        # The third one waited for a slot: a long one had finished first.
        assert any(task.done() for task in long)
        await asyncio.gather(*long)
        assert metric(await metrics(client), "llamacpp:preemptions_total") == before


async def test_the_server_marks_only_batch_requests() -> None:
    assert priority_headers() == {}
    token = request_priority.set(Priority.BATCH)
    try:
        assert priority_headers() == {"x-dmr-priority": "batch"}
    finally:
        request_priority.reset(token)


def test_batch_share_takes_a_count_or_minus_one() -> None:
    settings = apply_flags(WorkerSettings(), ["--batch-share", "2"])
    assert settings.batch_share == 2
    with pytest.raises(ValueError, match="--batch-share"):
        apply_flags(WorkerSettings(), ["--batch-share", "-2"])
