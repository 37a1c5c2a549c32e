"""The Responses dialect against a live server and SmolLM2, through the official `openai` client."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.fixtures.server import DmrServer

pytestmark = [pytest.mark.llama, pytest.mark.xdist_group("smollm2")]

MODEL = "ai/smollm2"


@pytest.fixture(scope="module")
def client(api_server: DmrServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_server.url}/v1", api_key="unused", max_retries=0)


def test_create_get_and_input_items(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0
    )
    assert response.status in ("completed", "incomplete")
    assert response.output_text
    assert response.usage is not None and response.usage.output_tokens > 0
    fetched = client.responses.retrieve(response.id)
    assert fetched.output_text == response.output_text
    items = client.responses.input_items.list(response.id)
    assert [item.type for item in items.data] == ["message"]


def test_previous_response_id_continues(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=8)
    second = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=8
    )
    assert second.previous_response_id == first.id
    # The second prompt carries the first turn, so it is longer than the question alone.
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens


def test_stream(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text
    assert client.responses.retrieve(events[-1].response.id).output_text == text  # type: ignore[union-attr]


def test_function_call_round_trip(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ]
    response = client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=tools,  # type: ignore[arg-type]
        tool_choice="required",
        max_output_tokens=64,
        temperature=0,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments).get("city")
    answer = client.responses.create(
        model=MODEL,
        previous_response_id=response.id,
        max_output_tokens=16,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    assert answer.output_text


def test_json_schema_text_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=MODEL,
        input="Name a city as JSON.",
        max_output_tokens=32,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
    )
    jsonschema.validate(json.loads(response.output_text), schema)


def test_delete(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": MODEL, "input": "x", "background": True}, 400),
        ({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, 400),
        ({"model": MODEL}, 400),
        ({"model": MODEL, "input": 42}, 400),
        ({"model": "ai/no-such-model", "input": "x"}, 404),
        ({"model": MODEL, "input": "x", "previous_response_id": "resp_gone"}, 404),
    ],
    ids=["background", "web-search", "no-input", "input-type", "unknown-model", "unknown-prev"],
)
def test_rejected_requests(api_server: DmrServer, body: dict, status: int) -> None:
    with api_server.client() as http:
        response = http.post("/v1/responses", json=body)
        assert response.status_code == status
        assert response.json()["error"]["message"]
        assert http.post("/v1/responses", content=b"{oops").status_code == 400
        assert http.get("/v1/models").status_code == 200
