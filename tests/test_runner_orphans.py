"""A runner whose server was SIGKILLed does not keep the model's memory forever."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.fixtures.server import start_server
from tests.fixtures.store import package_smollm2

pytestmark = [pytest.mark.llama, pytest.mark.slow]


def test_runner_exits_when_its_server_is_killed(tmp_path: Path, smollm2_gguf: Path) -> None:
    package_smollm2(tmp_path / "models", smollm2_gguf)
    server = start_server(tmp_path)
    try:
        chat = httpx.post(
            server.url + "/engines/v1/chat/completions",
            json={
                "model": "ai/smollm2",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            },
            timeout=120,
        )
        assert chat.status_code == 200, chat.text
        [runner] = httpx.get(server.url + "/engines/ps", timeout=10).json()
        runner_process = psutil.Process(runner["pid"])

        os.kill(server.process.pid, signal.SIGKILL)  # no chance to stop its runners
        server.process.wait(timeout=10)

        deadline = time.monotonic() + 15
        while runner_process.is_running() and runner_process.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the orphaned runner kept running"
            time.sleep(0.2)
    finally:
        server.stop()
