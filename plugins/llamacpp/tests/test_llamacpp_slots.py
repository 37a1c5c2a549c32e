"""More streams than slots: a runner whose slots the engine sized (`--adaptive-slots`)
serves 32 streams at once, every one to its end, letting requests into its slots
from 8 up as the measured step cost allows (runner/slot_limit.py)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from llamacpp_helpers import CPU, RunnerProcess, make_launch, short_socket

pytestmark = pytest.mark.llama

STREAMS = 32
TOKENS = 16


@pytest.fixture(scope="module")
def sized_runner(llama_bundle: Path) -> Iterator[RunnerProcess]:
    """Nobody set `--parallel`; the device and admission's budget have room for 32 slots
    of 512 tokens."""
    big = replace(CPU, total_memory=64 << 30, free_memory=64 << 30)
    launch = make_launch(
        llama_bundle, short_socket("slots"), context_size=512, parallel=None, device=big
    )
    runner = RunnerProcess(replace(launch, memory_budget=64 << 30))
    yield runner
    runner.stop()


def gauges(text: str) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in re.findall(r"^llamacpp:(\w+) ([0-9.e+-]+)$", text, re.MULTILINE)
    }


async def stream(client: httpx.AsyncClient, index: int) -> int:
    body = {
        "messages": [{"role": "user", "content": f"Write a line about the number {index}."}],
        "max_tokens": TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith('data: {"') and '"usage":{' in line.replace(" ", ""):
                found = re.search(r'"completion_tokens":\s*(\d+)', line)
                if found:
                    tokens = int(found.group(1))
    return tokens


async def test_thirty_two_streams_all_answer_from_eight_open_slots_up(
    sized_runner: RunnerProcess,
) -> None:
    async with sized_runner.async_client() as client:
        before = gauges((await client.get("/metrics")).text)
        assert before["slots"] == STREAMS
        assert before["slots_allowed"] == 8  # nothing measured yet
        seen: list[dict[str, float]] = []

        async def watch() -> None:
            while True:
                seen.append(gauges((await client.get("/metrics")).text))
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        try:
            answered = await asyncio.gather(*(stream(client, i) for i in range(STREAMS)))
        finally:
            watcher.cancel()
    # Every stream answered in full, whatever the limit did meanwhile.
    assert answered == [TOKENS] * STREAMS
    # The limit held requests back at first (8 open slots of 32, none measured), and
    # never let more in than it allowed at its highest.
    assert max(g["requests_deferred"] for g in seen) > 0
    assert max(g["requests_processing"] for g in seen) <= max(g["slots_allowed"] for g in seen)
    assert all(8 <= g["slots_allowed"] <= STREAMS for g in seen)
