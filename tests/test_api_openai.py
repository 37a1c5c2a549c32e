"""The OpenAI dialect against a live server and SmolLM2, through the official `openai` client."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.fixtures.server import DmrServer

pytestmark = [pytest.mark.llama, pytest.mark.xdist_group("smollm2")]

MODEL = "ai/smollm2"
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def client(api_server: DmrServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_server.url}/engines/v1", api_key="unused", max_retries=0)


def test_models_list_and_get(client: openai.OpenAI, api_server: DmrServer) -> None:
    ids = [model.id for model in client.models.list().data]
    assert "ai/smollm2:latest" in ids
    assert client.models.retrieve("ai/smollm2:latest").owned_by == "docker"
    alias = openai.OpenAI(base_url=f"{api_server.url}/v1", api_key="unused")
    assert "ai/smollm2:latest" in [model.id for model in alias.models.list().data]


def test_chat(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=8,
        temperature=0,
        seed=1,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_raw_stream_ends_with_done(api_server: DmrServer) -> None:
    with api_server.client() as http:
        body = {"model": MODEL, "messages": HI, "max_tokens": 4, "stream": True}
        response = http.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]")


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=6, temperature=0)
    assert isinstance(reply.choices[0].text, str) and reply.choices[0].text


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=MODEL, input=["hello", "a longer sentence"])
    vectors = [item.embedding for item in result.data]
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0
    assert vectors[0] != vectors[1]


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=MODEL,
        max_tokens=48,
        temperature=0,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    content = reply.choices[0].message.content or ""
    jsonschema.validate(json.loads(content), schema)


def test_tool_call(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    question = {"role": "user", "content": "What is the weather in Paris?"}
    reply = client.chat.completions.create(
        model=MODEL,
        max_tokens=64,
        temperature=0,
        tools=tools,  # type: ignore[arg-type]
        tool_choice="required",
        messages=[question],  # type: ignore[list-item]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.id and call.function.name == "get_weather"  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert isinstance(arguments.get("city"), str)
    # The result goes back as a tool message and the model answers in text.
    follow_up = client.chat.completions.create(
        model=MODEL,
        max_tokens=16,
        temperature=0,
        tools=tools,  # type: ignore[arg-type]
        messages=[
            question,
            choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
        ],
    )
    assert follow_up.choices[0].message.content


def test_preload_only(api_server: DmrServer) -> None:
    with api_server.client() as http:
        response = http.post(
            "/engines/v1/chat/completions",
            json={"model": MODEL, "messages": []},
            headers={"X-Preload-Only": "true"},
        )
        assert response.status_code == 200
        names = [item["model_name"] for item in http.get("/engines/ps").json()]
    assert MODEL in names


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'["a list"]', 400),
        (b'{"messages": []}', 400),
        (b'{"model": 7, "messages": []}', 400),
        (b'{"model": "ai/no-such-model", "messages": []}', 404),
    ],
    ids=["invalid-json", "not-object", "no-model", "model-type", "unknown-model"],
)
def test_malformed_requests(api_server: DmrServer, body: bytes, status: int) -> None:
    with api_server.client() as http:
        response = http.post(
            "/engines/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == status
        error = response.json()["error"]
        assert error["message"] and error["type"] and error["code"]
        assert http.get("/engines/v1/models").status_code == 200


def test_huge_body_is_413(api_server: DmrServer) -> None:
    body = b'{"model": "' + b"x" * (11 * 1024 * 1024) + b'"}'
    with api_server.client() as http:
        try:
            response = http.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError:  # the server may answer and close before the upload ends
            pass
        else:
            assert response.status_code == 413
            assert response.json()["error"]["code"] == "payload_too_large"
        assert http.get("/v1/models").status_code == 200


def test_sdk_sees_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ai/no-such-model", messages=HI)  # type: ignore[arg-type]
