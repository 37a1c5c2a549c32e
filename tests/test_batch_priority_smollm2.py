"""Interactive first, end to end: a chat batch fills every slot of the SmolLM2 runner
through `dmr serve`, a streamed chat still gets a slot at once (the server marks the
batch lines `x-dmr-priority: batch`, the runner preempts one), and the batch's answers
are the same as in a run without the chat (docs/batch.md, "Interactive first")."""

from __future__ import annotations

import io
import json
import re
import time
from typing import Any

import httpx
import openai

from tests.fixtures.server import DmrServer

MODEL = "ai/smollm2"
ENDED = {"completed", "failed", "expired", "cancelled"}
LINES = 8  # the runner's slots and DMR_BATCH_CONCURRENCY: the batch takes every slot
TOKENS = 96


def _metric(server: DmrServer, name: str) -> float:
    """The sum of a series over its labels in the server's /metrics (0 when absent)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    pattern = rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$"
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


def _start_batch(client: openai.OpenAI) -> Any:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
                "max_tokens": TOKENS,
                "temperature": 0,
                "ignore_eos": True,  # every line takes its slot for TOKENS steps
            },
        }
        for i in range(LINES)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def _finish(client: openai.OpenAI, batch: Any) -> dict[str, str]:
    """Wait for the batch to complete; its answers by custom_id."""
    deadline = time.monotonic() + 600
    while batch.status not in ENDED and time.monotonic() < deadline:
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    answers = {}
    for raw in client.files.content(batch.output_file_id).text.splitlines():
        line = json.loads(raw)
        body = line["response"]["body"]
        assert body["usage"]["completion_tokens"] == TOKENS
        answers[line["custom_id"]] = body["choices"][0]["message"]["content"]
    assert len(answers) == LINES
    return answers


def test_a_chat_preempts_a_full_batch_which_still_answers_the_same(
    smollm2_server: DmrServer,
) -> None:
    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="unused", max_retries=0)
    alone = _finish(client, _start_batch(client))
    preemptions = _metric(smollm2_server, "llamacpp:preemptions_total")

    batch = _start_batch(client)
    deadline = time.monotonic() + 120
    while _metric(smollm2_server, "llamacpp:requests_processing") < LINES:
        assert time.monotonic() < deadline, "the batch never filled the runner's slots"
        time.sleep(0.05)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    # The chat got its slot from the batch: it ended while every line was still going.
    assert client.batches.retrieve(batch.id).request_counts.completed == 0  # type: ignore[union-attr]
    assert text
    assert _metric(smollm2_server, "llamacpp:preemptions_total") >= preemptions + 1

    assert _finish(client, batch) == alone
