"""Anthropic dialect against a scripted runner, through the official `anthropic` client."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
from apis_harness import Harness


def _client(harness: Harness, prefix: str = "/anthropic") -> Any:
    return harness.anthropic(prefix)


@pytest.mark.parametrize("prefix", ["/anthropic", ""])
async def test_message_with_system_blocks_and_turns(harness: Harness, prefix: str) -> None:
    message = await _client(harness, prefix).messages.create(
        model="ai/smollm2",
        max_tokens=16,
        extra_body={"temperature": 0, "top_k": 5},
        system=[{"type": "text", "text": "Be terse."}],
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
            {"role": "user", "content": [{"type": "text", "text": "again"}]},
        ],
        stop_sequences=["END"],
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text == "Hello there"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 7 and message.usage.output_tokens == 3
    sent = harness.runner.last
    assert sent["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    assert sent["max_tokens"] == 16 and sent["stop"] == ["END"] and sent["top_k"] == 5


async def test_max_tokens_stop_reason(harness: Harness) -> None:
    harness.runner.finish_reason = "length"
    message = await _client(harness).messages.create(
        model="ai/smollm2", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.stop_reason == "max_tokens"


async def test_stream_events_in_order(harness: Harness) -> None:
    client = _client(harness)
    async with client.messages.stream(
        model="ai/smollm2", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    assert final.content[0].text == "Hello there"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 3


async def test_raw_stream_has_named_events(harness: Harness) -> None:
    async with harness.asgi_client() as http:
        response = await http.post(
            "/v1/messages",
            json={
                "model": "ai/smollm2",
                "max_tokens": 8,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
    events = [line[7:] for line in response.text.splitlines() if line.startswith("event: ")]
    assert events[:2] == ["message_start", "ping"]
    assert events[-2:] == ["message_delta", "message_stop"]
    assert events.count("content_block_delta") == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_use_round_trip(harness: Harness, stream: bool) -> None:
    harness.runner.tool_calls = [("call_9", "get_weather", '{"city": "Oslo"}')]
    harness.runner.finish_reason = "tool_calls"
    tools = [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    client = _client(harness)
    request = {
        "model": "ai/smollm2",
        "max_tokens": 32,
        "tools": tools,
        "tool_choice": {"type": "any"},
        "messages": [{"role": "user", "content": "weather in Oslo?"}],
    }
    if stream:
        async with client.messages.stream(**request) as events:  # type: ignore[arg-type]
            message = await events.get_final_message()
    else:
        message = await client.messages.create(**request)  # type: ignore[arg-type]
    assert message.stop_reason == "tool_use"
    (tool_use,) = [block for block in message.content if block.type == "tool_use"]
    assert tool_use.name == "get_weather" and tool_use.input == {"city": "Oslo"}
    sent = harness.runner.last
    assert sent["tools"][0]["function"]["parameters"] == tools[0]["input_schema"]
    assert sent["tool_choice"] == "required"
    # The result goes back as an OpenAI tool message tied to the call.
    harness.runner.tool_calls = []
    harness.runner.finish_reason = "stop"
    await client.messages.create(
        model="ai/smollm2",
        max_tokens=8,
        tools=tools,  # type: ignore[arg-type]
        messages=[
            {"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": [tool_use.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "cold"}],
            },
        ],
    )
    messages = harness.runner.last["messages"]
    assert messages[1]["tool_calls"][0]["id"] == tool_use.id
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert messages[2] == {"role": "tool", "tool_call_id": tool_use.id, "content": "cold"}


async def test_count_tokens_uses_template_and_tokenizer(harness: Harness) -> None:
    counted = await _client(harness).messages.count_tokens(
        model="ai/smollm2", system="sys", messages=[{"role": "user", "content": "hello"}]
    )
    # The scripted runner renders "<system>sys<user>hello" and gives a token per character.
    assert counted.input_tokens == len("<system>sys<user>hello")
    assert [path for path, _ in harness.runner.requests] == ["/apply-template", "/tokenize"]


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        (b"{bad", 400, "invalid_request_error"),
        (
            b'{"model": "ai/smollm2", "messages": [{"role": "user", "content": "x"}]}',
            400,
            "invalid_request_error",
        ),  # max_tokens missing
        (
            b'{"model": "ai/smollm2", "max_tokens": "many", "messages": []}',
            400,
            "invalid_request_error",
        ),
        (
            b'{"model": "ai/smollm2", "max_tokens": 5, "messages": "hi"}',
            400,
            "invalid_request_error",
        ),
        (
            b'{"model": "ai/smollm2", "max_tokens": 5, "messages": [{"role": "robot", '
            b'"content": "x"}]}',
            400,
            "invalid_request_error",
        ),
        (
            b'{"model": "ai/nope", "max_tokens": 5, "messages": [{"role": "user", '
            b'"content": "x"}]}',
            404,
            "not_found_error",
        ),
        (b'{"model": "' + b"x" * (70 * 1024) + b'"}', 413, "request_too_large"),
    ],
    ids=["json", "no-max-tokens", "max-tokens-type", "messages-type", "role", "model", "huge"],
)
async def test_bad_requests_answer_in_anthropic_shape(
    harness: Harness, body: bytes, status: int, error_type: str
) -> None:
    async with harness.asgi_client() as http:
        response = await http.post("/anthropic/v1/messages", content=body)
        assert response.status_code == status, response.text
        payload = response.json()
        assert payload["type"] == "error"
        assert payload["error"]["type"] == error_type and payload["error"]["message"]
        ok = await http.post(
            "/anthropic/v1/messages",
            json={
                "model": "ai/smollm2",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        assert ok.status_code == 200


async def test_sdk_raises_typed_errors(harness: Harness) -> None:
    with pytest.raises(anthropic.NotFoundError):
        await _client(harness).messages.create(
            model="ai/nope", max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
