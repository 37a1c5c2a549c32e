"""A runner killed (SIGKILL) while it streams to several clients at once.

tests/test_scheduler_smollm2.py kills a runner under one stream; here eight
streams are in flight: each must end with `[DONE]` (it finished first) or an
SSE error event, none may hang, the server keeps serving, the next request
starts a fresh runner, and `/metrics` counts the crash.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import start_server
from tests.reliability.figures import record
from tests.reliability.live import metric, put_smollm2

pytestmark = [pytest.mark.llama, pytest.mark.slow]

CHAT = "/engines/v1/chat/completions"
STREAMS = 8


def test_runner_killed_under_eight_streams(tmp_path: Path, smollm2_gguf: Path) -> None:
    put_smollm2(tmp_path / "models", smollm2_gguf, "ai/smollm2", "2024-11-01T00:00:00Z")
    server = start_server(tmp_path)
    try:
        body = {
            "model": "ai/smollm2",
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
            "stream": True,
            "max_tokens": 1500,
        }
        started_streams = asyncio.Event()
        first_events = 0
        error_messages: list[str] = []

        async def stream(client: httpx.AsyncClient) -> str:
            nonlocal first_events
            seen_first = False
            last = ""
            async with client.stream("POST", CHAT, json=body) as answer:
                assert answer.status_code == 200
                async for line in answer.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    last = line[6:]
                    if not seen_first:
                        seen_first = True
                        first_events += 1
                        if first_events == STREAMS:
                            started_streams.set()
            if last == "[DONE]":
                return "done"
            event = json.loads(last)
            if "error" not in event:
                return f"truncated: {last[:80]}"
            error_messages.append(event["error"]["message"])
            return "error"

        async def run() -> tuple[list[str], int, float]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                tasks = [asyncio.create_task(stream(client)) for _ in range(STREAMS)]
                await asyncio.wait_for(started_streams.wait(), timeout=120)
                [runner] = (await client.get("/engines/ps")).json()
                os.kill(runner["pid"], signal.SIGKILL)
                killed_at = time.monotonic()
                endings = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
                return endings, runner["pid"], time.monotonic() - killed_at

        endings, pid, drained = asyncio.run(run())
        after = httpx.post(
            server.url + CHAT,
            json={
                "model": "ai/smollm2",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 8,
            },
            timeout=120,
        )
        [fresh] = httpx.get(server.url + "/engines/ps", timeout=30).json()
        crashes = metric(server, "dmr_runner_crashes_total")
        record(
            "runner_sigkill_mid_stream",
            streams=STREAMS,
            endings=dict(Counter(endings)),
            seconds_to_end_all_streams=round(drained, 2),
            next_request=after.status_code,
            crashes_metric=crashes,
            error_message=error_messages[0][:160] if error_messages else None,
        )
        assert set(endings) <= {"done", "error"}, endings
        assert "error" in endings
        assert all("SIGKILL" in message for message in error_messages), error_messages
        assert after.status_code == 200
        assert fresh["pid"] != pid
        assert crashes == 1
        assert server.process.poll() is None
    finally:
        server.stop()
