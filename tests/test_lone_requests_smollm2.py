"""Through a real `dmr serve` and the llama.cpp runner on SmolLM2: requests a client
sends one after another reach the runner marked as alone (`x-dmr-lone`), and its idle
decode loop starts each without waiting for a burst (dmr/server/arrivals.py,
plugins/llamacpp's runner/burst.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.server import DmrServer
from tests.test_free_cores_smollm2 import runner_value
from tests.test_scheduler_smollm2 import put_smollm2

pytestmark = [pytest.mark.llama]

MODEL = "ai/smollm2"


def test_one_request_at_a_time_starts_without_the_burst_wait(
    dmr_server_factory: Callable[..., DmrServer], smollm2_gguf: Path
) -> None:
    server = dmr_server_factory()
    put_smollm2(server, smollm2_gguf, MODEL, "2024-11-01T00:00:00Z")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    with server.client(timeout=300) as client:
        for _ in range(3):
            with client.stream("POST", "/engines/v1/chat/completions", json=body) as answer:
                assert answer.status_code == 200
                assert "data: [DONE]" in answer.read().decode()
    assert runner_value(server, "llamacpp:lone_starts") == 3
