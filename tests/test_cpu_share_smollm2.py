"""CPU runners share the cores (docs/scheduler.md): while two SmolLM2 runners of one
`dmr serve` both generate, each computes with half the threads it loaded with, and
the one left generating gets them all back. Real server, real llama.cpp runners."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.server import DmrServer
from tests.test_scheduler_smollm2 import put_smollm2

# Serial: a neighbour test's busy runner (quickstart's 256-token answer) takes cores
# that the free-core reading then keeps from these runners, so their thread counts
# were not the share's alone (it failed twice beside it in session 22's proof runs).
pytestmark = [pytest.mark.llama, pytest.mark.slow, pytest.mark.serial]

ServerFactory = Callable[..., DmrServer]
CHAT = "/engines/v1/chat/completions"
MODELS = ("ai/smollm2-a", "ai/smollm2-b")


def two_models(dmr_server_factory: ServerFactory, gguf: Path, **env: str) -> DmrServer:
    # The runners' threads follow the share alone here, not what else this machine
    # runs meanwhile (DMR_FREE_CORES, tests/test_free_cores_smollm2.py).
    server = dmr_server_factory(**{"DMR_FREE_CORES": "0", **env})
    put_smollm2(server, gguf, MODELS[0], "2024-11-01T00:00:00Z")
    put_smollm2(server, gguf, MODELS[1], "2024-11-02T00:00:00Z")
    return server


async def runner_metric(client: httpx.AsyncClient, name: str) -> dict[str, int]:
    """A runner metric's value for each loaded runner, by model."""
    text = (await client.get("/metrics")).text
    found: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                if sample.name in (name, f"{name}_total"):
                    model = next(m for m in MODELS if sample.labels["model"].startswith(m))
                    found[model] = int(sample.value)
    return found


async def long_runner_tokens(client: httpx.AsyncClient) -> int:
    """The tokens the second model's runner has generated so far."""
    return (await runner_metric(client, "llamacpp:tokens_predicted"))[MODELS[1]]


async def threads(client: httpx.AsyncClient) -> dict[str, int]:
    """`llamacpp:threads` of each loaded runner, by model."""
    return await runner_metric(client, "llamacpp:threads")


async def generate(client: httpx.AsyncClient, model: str, tokens: int) -> int:
    """A streamed chat of `tokens` tokens; the completion tokens its usage reports."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage = None
    async with client.stream("POST", CHAT, json=body) as answer:
        assert answer.status_code == 200
        async for line in answer.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage is not None
    return int(usage["completion_tokens"])


async def until(check: Callable[[dict[str, int]], bool], client: httpx.AsyncClient) -> None:
    for _ in range(1500):
        if check(await threads(client)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"threads stayed {await threads(client)}")


async def loaded_threads(client: httpx.AsyncClient) -> int:
    """Both runners loaded (one request each); the threads each loaded with."""
    for model in MODELS:
        assert await generate(client, model, 2) == 2
    loaded = await threads(client)
    assert set(loaded) == set(MODELS) and len(set(loaded.values())) == 1, loaded
    alone = loaded[MODELS[0]]
    # Halving needs two threads: this machine's cores, llama.cpp's default.
    assert alone >= 2, f"the runners loaded with {alone} thread"
    return alone


def test_two_busy_cpu_runners_halve_their_threads_and_the_last_one_gets_them_back(
    dmr_server_factory: ServerFactory, smollm2_gguf: Path
) -> None:
    server = two_models(dmr_server_factory, smollm2_gguf)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            alone = await loaded_threads(client)
            shared = alone // 2
            # The long answer first, under way before the short one starts: started
            # together, the short one could end before the long one's first step,
            # and the two were never seen sharing (a CI run of 2026-12-07).
            generated = await long_runner_tokens(client)
            long = asyncio.create_task(generate(client, MODELS[1], 600))
            while await long_runner_tokens(client) <= generated:
                assert not long.done()
                await asyncio.sleep(0.02)
            short = asyncio.create_task(generate(client, MODELS[0], 48))
            await until(lambda now: set(now.values()) == {shared}, client)
            assert not long.done()
            assert await short == 48
            await until(lambda now: now[MODELS[1]] == alone, client)
            assert not long.done(), "the long answer ended before its runner was alone"
            assert await long == 600

    asyncio.run(run())


def test_dmr_cpu_share_0_leaves_the_threads_alone(
    dmr_server_factory: ServerFactory, smollm2_gguf: Path
) -> None:
    server = two_models(dmr_server_factory, smollm2_gguf, DMR_CPU_SHARE="0")

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            alone = await loaded_threads(client)
            answers = [asyncio.create_task(generate(client, model, 64)) for model in MODELS]
            seen: set[int] = set()
            while not all(answer.done() for answer in answers):
                seen |= set((await threads(client)).values())
                await asyncio.sleep(0.05)
            assert seen == {alone}
            assert [answer.result() for answer in answers] == [64, 64]

    asyncio.run(run())
