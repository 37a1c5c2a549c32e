"""A real `dmr serve` computes SmolLM2's (Q4_1) batches with dmr's batched kernel, and
its greedy answers are those of llama.cpp's own kernel (plugins/llamacpp's
runner/q4_1_gemm.py, docs/scheduler.md "Batched Q4_1 products"). The same concurrent
requests go to a server with the kernel turned off."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fixtures.server import DmrServer
from tests.test_free_cores_smollm2 import runner_value
from tests.test_scheduler_smollm2 import put_smollm2

pytestmark = [pytest.mark.llama]

MODEL = "ai/smollm2"
QUESTIONS = [
    "Write a story about a lighthouse keeper.",
    "Explain how bread is made.",
    "Describe a busy market in a small town.",
    "Tell me about the planet Mars.",
    "Write a poem about autumn leaves.",
    "Explain why the sky is blue.",
]


def _answer(server: DmrServer, question: str) -> str:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 48,
        "temperature": 0,
    }
    with server.client(timeout=300) as client:
        answer = client.post("/engines/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["choices"][0]["message"]["content"])


def _answers_at_once(server: DmrServer) -> list[str]:
    """Every question at once, so that the runner decodes them in one batch."""
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        return list(pool.map(lambda question: _answer(server, question), QUESTIONS))


def test_concurrent_greedy_answers_are_computed_by_the_kernel_and_unchanged(
    dmr_server_factory: Callable[..., DmrServer], smollm2_gguf: Path
) -> None:
    with_kernel = dmr_server_factory()
    put_smollm2(with_kernel, smollm2_gguf, MODEL, "2024-11-01T00:00:00Z")
    answers = _answers_at_once(with_kernel)
    assert runner_value(with_kernel, "llamacpp:q4_1_batched_products") > 0
    with_kernel.stop()

    without = dmr_server_factory(DMR_LLAMACPP_Q4_1_GEMM="0")
    put_smollm2(without, smollm2_gguf, MODEL, "2024-11-01T00:00:00Z")
    assert _answers_at_once(without) == answers
    assert runner_value(without, "llamacpp:q4_1_batched_products") == 0
    assert all(answer.strip() for answer in answers)
