"""A runner of a real `dmr serve`, with nothing configured, loads SmolLM2's weights into
llama.cpp's extra buffers (AMX on an Intel Xeon that has it) exactly where the
installed llama.cpp build runs them, and answers a prompt of many tokens either way:
the batch on which a GCC 12 build's AMX kernels crash (docs/scheduler.md, "Extra
weight buffers"). The check is the real one, in a real child process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from dmr_llamacpp.runner.extra_buffers import extra_buffers_usable

from tests.fixtures.server import DmrServer
from tests.test_free_cores_smollm2 import runner_value
from tests.test_scheduler_smollm2 import put_smollm2

pytestmark = [pytest.mark.llama]

MODEL = "ai/smollm2"


def test_a_default_runner_uses_the_extra_buffers_exactly_where_they_run(
    dmr_server_factory: Callable[..., DmrServer], smollm2_gguf: Path
) -> None:
    server = dmr_server_factory()
    put_smollm2(server, smollm2_gguf, MODEL, "2024-11-01T00:00:00Z")
    prompt = "Summarise this log: " + " ".join(f"line {n} says ok." for n in range(40))
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with server.client(timeout=300) as client:
        answer = client.post("/engines/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] > 100
    assert answer.json()["choices"][0]["message"]["content"]
    # The same real check, from this process: its answer is kept per build and CPU.
    expected = extra_buffers_usable(smollm2_gguf, {})
    assert runner_value(server, "llamacpp:extra_weight_buffers") == int(expected)
