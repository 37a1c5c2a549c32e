"""A chat batch and an embeddings batch on the real SmolLM2 through `dmr serve`, with
the official `openai` client, a few bad lines among them; then `dmr batch` on the
CLI."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import openai

from tests.fixtures.server import DmrServer

MODEL = "ai/smollm2"
ENDED = {"completed", "failed", "expired", "cancelled"}


def _run_batch(client: openai.OpenAI, lines: list[Any], endpoint: str) -> Any:
    data = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(data.encode())), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )
    deadline = time.monotonic() + 600
    while batch.status not in ENDED and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    return batch


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_chat_and_embeddings_batches_complete_on_smollm2(smollm2_server: DmrServer) -> None:
    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="unused", max_retries=0)
    chats: list[Any] = [
        {
            "custom_id": f"chat-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Say the number {i}."}],
                "max_tokens": 4,
                "temperature": 0,
            },
        }
        for i in range(36)
    ]
    chats.insert(5, "{broken json")
    chats.insert(9, {**chats[0], "custom_id": "bad-model", "body": {"model": "ai/nothing"}})
    chat_batch = _run_batch(client, chats, "/v1/chat/completions")

    embeds: list[Any] = [
        {
            "custom_id": f"embed-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": MODEL, "input": [f"sentence number {i}", "and another"]},
        }
        for i in range(14)
    ]
    embeds.append({**embeds[0], "custom_id": "embed-0"})  # a duplicate custom_id
    embed_batch = _run_batch(client, embeds, "/v1/embeddings")

    assert chat_batch.status == "completed", chat_batch
    counts = chat_batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (38, 36, 2)
    outputs = _lines(client, chat_batch.output_file_id)
    assert sorted(line["custom_id"] for line in outputs) == sorted(f"chat-{i}" for i in range(36))
    for line in outputs:
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] <= 4
    errors = _lines(client, chat_batch.error_file_id)
    assert sorted(str(line["custom_id"]) for line in errors) == ["None", "bad-model"]

    assert embed_batch.status == "completed", embed_batch
    counts = embed_batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (15, 14, 1)
    vectors = _lines(client, embed_batch.output_file_id)
    assert len(vectors) == 14
    for line in vectors:
        data = line["response"]["body"]["data"]
        assert len(data) == 2 and len(data[0]["embedding"]) == len(data[1]["embedding"]) > 100
    (duplicate,) = _lines(client, embed_batch.error_file_id)
    assert duplicate["error"]["code"] == "duplicate_custom_id"
    assert len(outputs) + len(vectors) >= 50
