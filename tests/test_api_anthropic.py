"""The Anthropic dialect against a live server and SmolLM2, through the official client."""

from __future__ import annotations

import anthropic
import pytest

from tests.fixtures.server import DmrServer

pytestmark = [pytest.mark.llama, pytest.mark.xdist_group("smollm2")]

MODEL = "ai/smollm2"
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def client(api_server: DmrServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"{api_server.url}/anthropic", api_key="unused", max_retries=0
    )


def test_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=8,
        system="You are terse.",
        messages=HI,  # type: ignore[arg-type]
        extra_body={"temperature": 0},
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 8


def test_max_tokens_stop_reason(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=1,
        messages=[{"role": "user", "content": "Write a long story about the sea."}],
    )
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 1


def test_stop_sequence_is_reported(client: anthropic.Anthropic) -> None:
    # A space turns up in any answer well within 32 tokens, so generation must stop there.
    story = [{"role": "user", "content": "Write a long story about the sea."}]
    message = client.messages.create(
        model=MODEL,
        max_tokens=32,
        stop_sequences=[" "],
        messages=story,  # type: ignore[arg-type]
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == " "
    assert " " not in "".join(b.text for b in message.content if b.type == "text").strip()
    with client.messages.stream(
        model=MODEL,
        max_tokens=32,
        stop_sequences=[" "],
        messages=story,  # type: ignore[arg-type]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == " "


def test_multi_turn_and_blocks(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=8,
        system=[{"type": "text", "text": "You are terse."}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "My name is Ada."}]},
            {"role": "assistant", "content": "Hello Ada."},
            {"role": "user", "content": "What is my name?"},
        ],
    )
    assert message.content[0].type == "text"


def test_stream(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=8, messages=HI) as stream:  # type: ignore[arg-type]
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds and "message_delta" in kinds
    assert final.content[0].type == "text" and final.content[0].text
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0


def test_count_tokens(client: anthropic.Anthropic) -> None:
    short = client.messages.count_tokens(model=MODEL, messages=HI)  # type: ignore[arg-type]
    longer = client.messages.count_tokens(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello. " * 10}],
    )
    # The chat template adds the same frame to both; only the text differs.
    assert 0 < short.input_tokens < longer.input_tokens
    assert longer.input_tokens - short.input_tokens >= 9 * 3
    message = client.messages.create(model=MODEL, max_tokens=1, messages=HI)  # type: ignore[arg-type]
    # Anthropic counts prompt tokens read from a cache apart from input_tokens.
    cached = message.usage.cache_read_input_tokens or 0
    assert message.usage.input_tokens + cached == short.input_tokens


def test_tool_use(client: anthropic.Anthropic) -> None:
    tools = [
        {
            "name": "get_weather",
            "description": "Current weather in a city",
            "input_schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ]
    question = {"role": "user", "content": "What is the weather in Paris?"}
    message = client.messages.create(
        model=MODEL,
        max_tokens=64,
        tools=tools,
        tool_choice={"type": "any"},  # type: ignore[arg-type]
        messages=[question],  # type: ignore[list-item]
    )
    assert message.stop_reason == "tool_use"
    (use,) = [block for block in message.content if block.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input, dict) and use.id
    follow_up = client.messages.create(
        model=MODEL,
        max_tokens=16,
        tools=tools,  # type: ignore[arg-type]
        messages=[
            question,  # type: ignore[list-item]
            {"role": "assistant", "content": [use.model_dump()]},  # type: ignore[list-item]
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}
                ],
            },
        ],
    )
    assert follow_up.content[0].type == "text"


def test_tool_use_stream(client: anthropic.Anthropic) -> None:
    tools = [
        {
            "name": "get_weather",
            "description": "Current weather in a city",
            "input_schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ]
    with client.messages.stream(
        model=MODEL,
        max_tokens=64,
        tools=tools,
        tool_choice={"type": "any"},  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "content_block_delta" in kinds
    assert final.stop_reason == "tool_use"
    (use,) = [block for block in final.content if block.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input, dict)


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        (b"{oops", 400, "invalid_request_error"),
        (
            b'{"model": "ai/smollm2", "messages": [{"role": "user", "content": "x"}]}',
            400,
            "invalid_request_error",
        ),
        (
            b'{"model": "ai/smollm2", "max_tokens": 4, "messages": [{"role": "user", '
            b'"content": 5}]}',
            400,
            "invalid_request_error",
        ),
        (
            b'{"model": "ai/no-such-model", "max_tokens": 4, "messages": [{"role": "user", '
            b'"content": "x"}]}',
            404,
            "not_found_error",
        ),
    ],
    ids=["json", "no-max-tokens", "content-type", "unknown-model"],
)
def test_malformed_requests(
    api_server: DmrServer, body: bytes, status: int, error_type: str
) -> None:
    with api_server.client() as http:
        response = http.post("/anthropic/v1/messages", content=body)
        assert response.status_code == status
        payload = response.json()
        assert payload["type"] == "error" and payload["error"]["type"] == error_type
        assert http.get("/v1/models").status_code == 200


def test_huge_body(api_server: DmrServer) -> None:
    import httpx

    body = b'{"model": "' + b"x" * (11 * 1024 * 1024) + b'"}'
    with api_server.client() as http:
        try:
            response = http.post("/v1/messages", content=body)
        except httpx.HTTPError:
            pass
        else:
            assert response.status_code == 413
            assert response.json()["error"]["type"] == "request_too_large"
        assert http.get("/v1/models").status_code == 200
