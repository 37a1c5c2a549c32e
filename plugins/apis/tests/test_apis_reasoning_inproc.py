"""A reasoning model's thinking (the runner's `reasoning_content`) in the translating
dialects, and their thinking switches, against a scripted runner and official clients."""

from __future__ import annotations

import anthropic
import pytest
from apis_harness import Harness

HI = [{"role": "user", "content": "hi"}]


async def test_anthropic_thinking_block_whole(harness: Harness) -> None:
    harness.runner.reasoning_pieces = ["let me ", "think"]
    message = await harness.anthropic().messages.create(
        model="ai/smollm2",
        max_tokens=64,
        messages=HI,
        thinking={"type": "enabled", "budget_tokens": 32},
    )
    assert [block.type for block in message.content] == ["thinking", "text"]
    thinking = message.content[0]
    assert thinking.type == "thinking" and thinking.thinking == "let me think"
    assert message.content[1].type == "text" and message.content[1].text == "Hello there"
    assert harness.runner.last["reasoning_budget"] == 32


async def test_anthropic_thinking_streamed(harness: Harness) -> None:
    harness.runner.reasoning_pieces = ["let me ", "think"]
    async with harness.anthropic().messages.stream(
        model="ai/smollm2", max_tokens=64, messages=HI
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert deltas[:2] == ["thinking_delta", "thinking_delta"] and "text_delta" in deltas
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["thinking", "text"]
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].type == "thinking" and final.content[0].thinking == "let me think"
    assert final.content[1].type == "text" and final.content[1].text == "Hello there"


async def test_anthropic_thinking_disabled_and_checked(harness: Harness) -> None:
    await harness.anthropic().messages.create(
        model="ai/smollm2", max_tokens=8, messages=HI, thinking={"type": "disabled"}
    )
    assert harness.runner.last["chat_template_kwargs"] == {"enable_thinking": False}
    with pytest.raises(anthropic.BadRequestError):
        await harness.anthropic().messages.create(
            model="ai/smollm2",
            max_tokens=8,
            messages=HI,
            thinking={"type": "enabled", "budget_tokens": 0},
        )


@pytest.mark.parametrize("stream", [False, True])
async def test_ollama_thinking_chat_and_generate(harness: Harness, stream: bool) -> None:
    harness.runner.reasoning_pieces = ["let me ", "think"]
    client = harness.ollama()
    if stream:
        chat = await client.chat(model="smollm2", messages=HI, stream=True)
        parts = [part async for part in chat]
        thinking = "".join(part.message.thinking or "" for part in parts)
        content = "".join(part.message.content or "" for part in parts)
        generated = [
            part async for part in await client.generate(model="smollm2", prompt="hi", stream=True)
        ]
        generate_thinking = "".join(part.thinking or "" for part in generated)
    else:
        reply = await client.chat(model="smollm2", messages=HI, stream=False, think=True)
        thinking, content = reply.message.thinking or "", reply.message.content
        generate_thinking = (await client.generate(model="smollm2", prompt="hi")).thinking or ""
    assert (thinking, content) == ("let me think", "Hello there")
    assert generate_thinking == "let me think"


async def test_responses_reasoning_item(harness: Harness) -> None:
    harness.runner.reasoning_pieces = ["let me ", "think"]
    client = harness.openai()
    response = await client.responses.create(model="ai/smollm2", input="one")
    assert [item.type for item in response.output] == ["reasoning", "message"]
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "let me think"
    assert response.output_text == "Hello there"
    # The next turn gets the answer, not the thinking.
    await client.responses.create(model="ai/smollm2", input="two", previous_response_id=response.id)
    assert harness.runner.last["messages"][1] == {"role": "assistant", "content": "Hello there"}


async def test_responses_reasoning_streamed(harness: Harness) -> None:
    """Thinking streams as a reasoning item (reasoning_text deltas) before the message,
    which then takes output index 1; the final response holds both."""
    harness.runner.reasoning_pieces = ["let me ", "think"]
    client = harness.openai()
    async with client.responses.stream(model="ai/smollm2", input="one") as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [event.type for event in events]
    thinking = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(thinking) == "let me think"
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.output_index, e.item.type) for e in added] == [(0, "reasoning"), (1, "message")]
    text = [e for e in events if e.type == "response.output_text.delta"]
    assert all(e.output_index == 1 for e in text)
    assert [item.type for item in final.output] == ["reasoning", "message"]
    reasoning = final.output[0]
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "let me think"
    assert final.output_text == "Hello there"
