"""Responses dialect against a scripted runner, through the official `openai` client."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from apis_harness import Harness


def _client(harness: Harness, prefix: str = "/v1") -> Any:
    return harness.openai(prefix)


@pytest.mark.parametrize("prefix", ["/v1", "", "/engines/v1"])
async def test_create_get_and_input_items(harness: Harness, prefix: str) -> None:
    client = _client(harness, prefix)
    response = await client.responses.create(
        model="ai/smollm2",
        input="hi",
        instructions="Be brief.",
        max_output_tokens=8,
        temperature=0,
    )
    assert response.status == "completed"
    assert response.output_text == "Hello there"
    assert response.usage is not None and response.usage.total_tokens == 10
    sent = harness.runner.last
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert sent["max_tokens"] == 8 and sent["temperature"] == 0
    again = await client.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == "Hello there"
    items = await client.responses.input_items.list(response.id)
    assert [item.type for item in items.data] == ["message"]


async def test_previous_response_id_continues(harness: Harness) -> None:
    client = _client(harness)
    first = await client.responses.create(
        model="ai/smollm2", input="one", instructions="Only first turn."
    )
    await client.responses.create(model="ai/smollm2", input="two", previous_response_id=first.id)
    assert harness.runner.last["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "two"},
    ]


async def test_stream_events(harness: Harness) -> None:
    client = _client(harness)
    stream = await client.responses.create(model="ai/smollm2", input="hi", stream=True)
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "Hello there"
    numbers = [event.sequence_number for event in events]
    assert numbers == list(range(len(events)))
    completed = events[-1].response  # type: ignore[union-attr]
    assert completed.output_text == "Hello there"
    assert (await client.responses.retrieve(completed.id)).status == "completed"


@pytest.mark.parametrize("stream", [False, True])
async def test_function_calls(harness: Harness, stream: bool) -> None:
    harness.runner.tool_calls = [("call_5", "lookup", '{"q": "x"}')]
    harness.runner.finish_reason = "tool_calls"
    client = _client(harness)
    tools = [
        {
            "type": "function",
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        }
    ]
    if stream:
        events = [
            e
            async for e in await client.responses.create(
                model="ai/smollm2", input="find x", tools=tools, stream=True
            )
        ]  # type: ignore[arg-type]
        response = events[-1].response  # type: ignore[union-attr]
    else:
        response = await client.responses.create(model="ai/smollm2", input="find x", tools=tools)  # type: ignore[arg-type]
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "lookup" and call.arguments == '{"q": "x"}' and call.call_id == "call_5"
    harness.runner.tool_calls = []
    await client.responses.create(
        model="ai/smollm2",
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": "call_5", "output": "found"}],
    )
    messages = harness.runner.last["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == "call_5"
    assert messages[-1] == {"role": "tool", "tool_call_id": "call_5", "content": "found"}


async def test_json_schema_text_format(harness: Harness) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    await _client(harness).responses.create(
        model="ai/smollm2",
        input="n?",
        text={"format": {"type": "json_schema", "name": "n", "schema": schema}},
    )
    assert harness.runner.last["response_format"]["json_schema"]["schema"] == schema


async def test_delete_and_missing(harness: Harness) -> None:
    client = _client(harness)
    response = await client.responses.create(model="ai/smollm2", input="hi")
    await client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(
            model="ai/smollm2", input="x", previous_response_id="resp_missing"
        )


async def test_store_false_is_not_kept(harness: Harness) -> None:
    client = _client(harness)
    response = await client.responses.create(model="ai/smollm2", input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "ai/smollm2", "input": "x", "background": True}, 400, "background"),
        (
            {"model": "ai/smollm2", "input": "x", "tools": [{"type": "web_search"}]},
            400,
            "web_search",
        ),
        ({"model": "ai/smollm2"}, 400, "input"),
        ({"model": "ai/smollm2", "input": 5}, 400, "input"),
        ({"model": "ai/smollm2", "input": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        (
            {"model": "ai/smollm2", "input": "x", "max_output_tokens": "lots"},
            400,
            "max_output_tokens",
        ),
        ({"model": "ai/nope", "input": "x"}, 404, "not found"),
        ({"input": "x"}, 400, "model"),
    ],
)
async def test_bad_requests(harness: Harness, body: dict, status: int, needle: str) -> None:
    async with harness.asgi_client() as http:
        response = await http.post("/v1/responses", json=body)
        assert response.status_code == status, response.text
        assert needle in response.json()["error"]["message"]
        assert (await http.post("/v1/responses", content=b"{x")).status_code == 400
        assert (
            await http.post("/v1/responses", json={"model": "ai/smollm2", "input": "ok"})
        ).status_code == 200
