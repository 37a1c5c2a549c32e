"""OpenAI dialect against a scripted runner: routing, pass-through, errors."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from apis_harness import Harness


def _client(harness: Harness, prefix: str = "/engines/v1") -> Any:
    return harness.openai(prefix)


async def test_models_list_and_get(harness: Harness) -> None:
    client = _client(harness)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["ai/smollm2:latest"]
    assert models.data[0].owned_by == "docker"
    model = await client.models.retrieve("ai/smollm2:latest")
    assert model.id == "ai/smollm2:latest"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("ai/nope")


@pytest.mark.parametrize("prefix", ["/engines/v1", "/v1", "/engines/llama.cpp/v1"])
async def test_chat_is_forwarded_unchanged(harness: Harness, prefix: str) -> None:
    client = _client(harness, prefix)
    reply = await client.chat.completions.create(
        model="ai/smollm2",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"top_k": 3},
    )
    assert reply.choices[0].message.content == "Hello there"
    path, body = harness.runner.requests[-1]
    assert path == "/v1/chat/completions"
    assert body["top_k"] == 3  # unknown fields reach the runner untouched
    assert harness.scheduler.acquired[-1]["backend"] == (
        "llama.cpp" if "llama.cpp" in prefix else None
    )


async def test_chat_stream_passes_sse_through(harness: Harness) -> None:
    client = _client(harness)
    stream = await client.chat.completions.create(
        model="ai/smollm2",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello there"


async def test_modes_follow_the_route(harness: Harness) -> None:
    client = _client(harness)
    await client.embeddings.create(model="ai/smollm2", input=["a", "b"])
    assert harness.scheduler.acquired[-1]["mode"] == "embedding"
    await client.completions.create(model="ai/smollm2", prompt="x")
    assert harness.runner.requests[-1][0] == "/v1/completions"
    async with harness.asgi_client() as http:
        await http.post("/rerank", json={"model": "ai/smollm2", "query": "q", "documents": []})
    assert harness.scheduler.acquired[-1]["mode"] == "reranking"
    assert harness.runner.requests[-1][0] == "/v1/rerank"


async def test_preload_only_loads(harness: Harness) -> None:
    async with harness.asgi_client() as http:
        response = await http.post(
            "/engines/v1/chat/completions",
            json={"model": "ai/smollm2", "messages": []},
            headers={"X-Preload-Only": "true"},
        )
    assert response.status_code == 200
    assert harness.scheduler.preloaded == [("ai/smollm2", "completion", None)]
    assert harness.runner.requests == []


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"", 400, "empty"),
        (json.dumps({"messages": []}).encode(), 400, "model"),
        (json.dumps({"model": 42}).encode(), 400, "string"),
        (json.dumps({"model": "ai/unknown"}).encode(), 404, "not found"),
        (b'{"model": "' + b"x" * (70 * 1024) + b'"}', 413, "larger"),
    ],
)
async def test_bad_requests_answer_in_openai_shape(
    harness: Harness, body: bytes, status: int, needle: str
) -> None:
    async with harness.asgi_client() as http:
        response = await http.post(
            "/engines/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert needle in error["message"]
        assert set(error) >= {"message", "type", "code"}
        assert (await http.get("/v1/models")).status_code == 200  # still serving


async def test_busy_is_503_with_retry_after(harness: Harness) -> None:
    harness.scheduler.busy = True
    client = _client(harness)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="ai/smollm2", messages=[])
    assert caught.value.status_code == 503
    assert caught.value.response.headers["Retry-After"] == "3"


async def test_unknown_backend_is_404(harness: Harness) -> None:
    async with harness.asgi_client() as http:
        response = await http.post("/engines/nope/v1/chat/completions", json={"model": "m"})
    assert response.status_code == 404
    assert "backend" in response.json()["error"]["message"]
