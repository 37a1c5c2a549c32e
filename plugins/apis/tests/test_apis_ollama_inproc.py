"""Ollama dialect against a scripted runner, through the official `ollama` client."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import ollama
import pytest
from apis_harness import TIMINGS, Harness


def _client(harness: Harness) -> Any:
    return harness.ollama()


async def test_version_tags_show(harness: Harness) -> None:
    client = _client(harness)
    async with harness.asgi_client() as http:
        assert "version" in (await http.get("/api/version")).json()
    listed = await client.list()
    assert [m.model for m in listed.models] == ["ai/smollm2:latest"]
    assert listed.models[0].details.format == "gguf"
    assert listed.models[0].size > 0
    shown = await client.show("smollm2")
    assert "{% for m in messages %}" in (shown.template or "")
    assert shown.details.family == "llama"
    assert "tools" in (shown.capabilities or [])
    assert shown.modelinfo["llama.context_length"] == "8192"


@pytest.mark.parametrize("name", ["smollm2", "smollm2:latest", "ai/smollm2", "ai/smollm2:latest"])
async def test_chat_non_stream_with_options(harness: Harness, name: str) -> None:
    reply = await _client(harness).chat(
        model=name,
        messages=[{"role": "user", "content": "hi"}],
        stream=False,
        format="json",
        keep_alive="10m",
        options={
            "num_predict": 5,
            "temperature": 0,
            "top_k": 4,
            "seed": 1,
            "stop": ["x"],
            "repeat_penalty": 1.1,
            "min_p": 0.05,
        },
    )
    assert reply.message.content == "Hello there"
    assert reply.done and reply.done_reason == "stop"
    assert reply.prompt_eval_count == TIMINGS["prompt_n"]
    assert reply.eval_count == TIMINGS["predicted_n"]
    assert reply.eval_duration == 30_000_000
    assert reply.prompt_eval_duration == 12_500_000
    assert reply.total_duration >= reply.eval_duration + reply.prompt_eval_duration
    sent = harness.runner.last
    assert sent["max_tokens"] == 5 and sent["temperature"] == 0 and sent["top_k"] == 4
    assert sent["seed"] == 1 and sent["stop"] == ["x"] and sent["min_p"] == 0.05
    assert sent["repeat_penalty"] == 1.1
    assert sent["response_format"] == {"type": "json_object"}
    assert harness.scheduler.acquired[-1]["keep_alive"] == 600.0


async def test_chat_stream_ndjson_and_final_stats(harness: Harness) -> None:
    parts = [
        part
        async for part in await _client(harness).chat(
            model="smollm2", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    ]
    assert "".join(p.message.content or "" for p in parts) == "Hello there"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    final = parts[-1]
    assert final.done_reason == "stop" and final.eval_count == 3
    assert final.load_duration is not None and final.load_duration >= 0


async def test_stream_is_default_and_ndjson(harness: Harness) -> None:
    async with harness.asgi_client() as http:
        response = await http.post(
            "/api/chat", json={"model": "smollm2", "messages": [{"role": "user", "content": "x"}]}
        )
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[-1]["done"] is True and len(lines) > 1


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_calls_come_whole(harness: Harness, stream: bool) -> None:
    harness.runner.tool_calls = [("call_1", "get_weather", '{"city": "Paris"}')]
    harness.runner.finish_reason = "tool_calls"
    tools: list[Any] = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    client = _client(harness)
    if stream:
        parts = [
            p
            async for p in await client.chat(
                model="smollm2",
                messages=[{"role": "user", "content": "w?"}],
                tools=tools,
                stream=True,
            )
        ]
        with_calls = [p for p in parts if p.message.tool_calls]
        assert len(with_calls) == 1  # never fragments
        message = with_calls[0].message
    else:
        message = (
            await client.chat(
                model="smollm2", messages=[{"role": "user", "content": "w?"}], tools=tools
            )
        ).message
    assert message.tool_calls is not None
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.arguments == {"city": "Paris"}
    assert harness.runner.last["tools"] == tools


async def test_tool_results_go_back_as_tool_messages(harness: Harness) -> None:
    await _client(harness).chat(
        model="smollm2",
        stream=False,
        messages=[
            {"role": "user", "content": "w?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
        ],
    )
    messages = harness.runner.last["messages"]
    call_id = messages[1]["tool_calls"][0]["id"]
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert messages[2] == {
        "role": "tool",
        "content": "sunny",
        "tool_call_id": call_id,
        "name": "get_weather",
    }


async def test_format_schema_and_think(harness: Harness) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    await _client(harness).chat(
        model="smollm2",
        messages=[{"role": "user", "content": "x"}],
        format=schema,
        think=False,
        stream=False,
    )
    sent = harness.runner.last
    assert sent["response_format"]["json_schema"]["schema"] == schema
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}


async def test_generate_and_load_unload(harness: Harness) -> None:
    client = _client(harness)
    reply = await client.generate(model="smollm2", prompt="Say hi", system="Be brief")
    assert reply.response == "Hello there" and reply.done
    assert harness.runner.last["messages"][0] == {"role": "system", "content": "Be brief"}
    raw = await client.generate(model="smollm2", prompt="1 2 3", raw=True)
    assert raw.response == "Hello there"
    assert harness.runner.requests[-1][0] == "/v1/completions"
    loaded = await client.generate(model="smollm2", prompt="")
    assert loaded.done_reason == "load"
    assert harness.scheduler.preloaded[-1][0] == "smollm2"
    unloaded = await client.generate(model="smollm2", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert harness.scheduler.unloaded == [["smollm2"]]


async def test_num_ctx_configures_the_runner(harness: Harness) -> None:
    await _client(harness).chat(
        model="smollm2",
        messages=[{"role": "user", "content": "x"}],
        options={"num_ctx": 1024},
        stream=False,
    )
    ((_, config),) = harness.scheduler.configured
    assert config.context_size == 1024
    assert "num_ctx" not in harness.runner.last


async def test_embed_and_legacy_embeddings(harness: Harness) -> None:
    client = _client(harness)
    result = await client.embed(model="smollm2", input=["a", "b"])
    assert len(result.embeddings) == 2 and result.embeddings[1][0] == pytest.approx(0.2)
    assert harness.scheduler.acquired[-1]["mode"] == "embedding"
    legacy = await client.embeddings(model="smollm2", prompt="a")
    assert list(legacy.embedding) == pytest.approx([0.1, 0.2, 0.3])


async def test_ps_reports_expiry(harness: Harness) -> None:
    client = _client(harness)
    await client.generate(model="smollm2", prompt="")
    (running,) = (await client.ps()).models
    # Named as /api/tags names it: Open WebUI matches the two lists by name.
    assert running.model == running.name == "ai/smollm2:latest"
    assert running.expires_at is not None and running.expires_at.year == 2026


async def test_copy_and_delete(harness: Harness) -> None:
    client = _client(harness)
    await client.copy("smollm2", "mine:v1")
    names = {m.model for m in (await client.list()).models}
    assert names == {"ai/smollm2:latest", "ai/mine:v1"}
    await client.delete("mine:v1")
    assert {m.model for m in (await client.list()).models} == {"ai/smollm2:latest"}
    with pytest.raises(ollama.ResponseError) as caught:
        await client.delete("mine:v1")
    assert caught.value.status_code == 404


async def test_create_from_uploaded_gguf_blob(harness: Harness, tmp_path: Any) -> None:

    gguf = _tiny_gguf(tmp_path / "tiny.gguf")
    client = _client(harness)
    digest = await client.create_blob(gguf)
    assert digest == "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    async with harness.asgi_client() as http:
        assert (await http.head(f"/api/blobs/{digest}")).status_code == 200
        assert (await http.head("/api/blobs/sha256:" + "0" * 64)).status_code == 404
    progress = await client.create(
        model="tiny",
        files={"tiny.gguf": digest},
        system="You are tiny.",
        parameters={"temperature": 0.25},
        template="{% for m in messages %}{{ m.content }}{% endfor %}",
    )
    assert progress.status == "success"
    shown = await client.show("tiny")
    assert shown.details.family == "llama"
    assert 'SYSTEM """You are tiny."""' in (shown.modelfile or "")
    assert "PARAMETER temperature 0.25" in (shown.modelfile or "")
    assert "{% for m in messages %}" in (shown.template or "")
    await client.chat(model="tiny", messages=[{"role": "user", "content": "x"}])
    sent = harness.runner.last
    assert sent["messages"][0] == {"role": "system", "content": "You are tiny."}
    assert sent["temperature"] == 0.25
    derived = await client.create(model="tiny2", from_="tiny", system="Other.")
    assert derived.status == "success"
    assert 'SYSTEM """Other."""' in ((await client.show("tiny2")).modelfile or "")


async def test_blob_upload_checks_digest(harness: Harness) -> None:
    async with harness.asgi_client() as http:
        response = await http.post("/api/blobs/sha256:" + "1" * 64, content=b"hello")
    assert response.status_code == 400
    assert "digest" in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/chat", b"{oops", 400),
        ("/api/chat", b'{"messages": []}', 400),
        ("/api/chat", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404),
        ("/api/chat", b'{"model": "smollm2", "messages": "hi"}', 400),
        ("/api/chat", b'{"model": "smollm2", "messages": [{"role": "x", "content": "y"}]}', 400),
        (
            "/api/chat",
            b'{"model": "smollm2", "messages": [{"role": "user", "content": "y"}],'
            b' "options": {"temperature": "hot"}}',
            400,
        ),
        ("/api/generate", b'{"model": "smollm2", "prompt": 5}', 400),
        ("/api/generate", b'{"model": "smollm2", "prompt": "x", "keep_alive": "soon"}', 400),
        ("/api/embed", b'{"model": "smollm2", "input": 3}', 400),
        ("/api/show", b'{"model": "nope"}', 404),
        ("/api/copy", b'{"source": "smollm2"}', 400),
        ("/api/create", b'{"model": "x"}', 400),
        ("/api/chat", b'{"model": "' + b"x" * (70 * 1024) + b'"}', 413),
    ],
)
async def test_bad_requests_answer_in_ollama_shape(
    harness: Harness, path: str, body: bytes, status: int
) -> None:
    async with harness.asgi_client() as http:
        response = await http.post(path, content=body)
        assert response.status_code == status, response.text
        error = response.json()
        assert list(error) == ["error"] and isinstance(error["error"], str)
        assert (await http.get("/api/tags")).status_code == 200


async def test_runner_errors_keep_their_status(harness: Harness) -> None:
    harness.runner.error = (400, "the prompt is too long")
    with pytest.raises(ollama.ResponseError) as caught:
        await _client(harness).chat(model="smollm2", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 400
    assert "too long" in caught.value.error


def _tiny_gguf(path: Any) -> Any:
    """A valid GGUF v3 file with a little metadata and no tensors."""
    import struct

    def string(text: str) -> bytes:
        data = text.encode()
        return struct.pack("<Q", len(data)) + data

    metadata = [
        ("general.architecture", 8, string("llama")),
        ("llama.context_length", 4, struct.pack("<I", 2048)),
    ]
    blob = b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata))
    for key, kind, value in metadata:
        blob += string(key) + struct.pack("<I", kind) + value
    path.write_bytes(blob)
    return path
