"""A streamed Anthropic message: the runner's chat stream, written as the Messages API's
events (`message_start`, content blocks, `message_delta`, `message_stop`).

The stream's state (the open block and its index) lives on one `MessageStream` per
request, each step a plain method.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

from dmr_apis.anthropic.translate import (
    anthropic_content,
    anthropic_stop_reason,
    anthropic_usage,
    message_id,
)
from dmr_apis.common.answer_fold import AnswerFold, TextDelta
from dmr_apis.common.streaming import encode_event

__all__ = ["MessageStream", "stop_of"]


def stop_of(answer: AnswerFold, stop_sequences: Any) -> tuple[str, str | None]:
    """Anthropic's `stop_reason` and `stop_sequence` for the runner's answer."""
    stop_reason, stop_sequence = anthropic_stop_reason(
        answer.finish_reason, matched_stop=answer.matched_stop, stop_sequences=stop_sequences
    )
    if answer.tool_calls and stop_reason == "end_turn":
        stop_reason = "tool_use"  # some runners say "stop" after a tool call
    return stop_reason, stop_sequence


def _block_start(index: int, block: dict[str, Any]) -> bytes:
    return encode_event(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def _block_delta(index: int, delta: dict[str, Any]) -> bytes:
    return encode_event(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    )


def _block_stop(index: int) -> bytes:
    return encode_event("content_block_stop", {"type": "content_block_stop", "index": index})


class MessageStream:
    """The events of one streamed message. A thinking block, when the model thinks,
    comes first and closes when the text starts; tool calls go out whole, each its
    own block, once all of their fragments arrived."""

    def __init__(self, model: Any, stop_sequences: Any) -> None:
        self.model = model
        self.stop_sequences = stop_sequences
        self.block_index = 0
        self.text_open = False
        self.thinking_open = False
        self.answer = AnswerFold()

    async def events(self, chunks: AsyncIterable[Mapping[str, Any]]) -> AsyncIterator[bytes]:
        """Every event of the message, from the runner's chat stream `chunks`."""
        yield self.message_start()
        yield encode_event("ping", {"type": "ping"})
        try:
            async for delta in self.answer.deltas(chunks):
                for event in self.on_delta(delta):
                    yield event
        except Exception as error:  # the stream broke after the 200 went out
            yield encode_event(
                "error",
                {"type": "error", "error": {"type": "api_error", "message": str(error)}},
            )
            return
        for event in self.finish():
            yield event

    def message_start(self) -> bytes:
        message = {
            "id": message_id(),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return encode_event("message_start", {"type": "message_start", "message": message})

    def on_delta(self, delta: TextDelta) -> list[bytes]:
        events: list[bytes] = []
        if delta.reasoning and not self.text_open:
            if not self.thinking_open:
                self.thinking_open = True
                thinking = {"type": "thinking", "thinking": "", "signature": ""}
                events.append(_block_start(self.block_index, thinking))
            events.append(
                _block_delta(
                    self.block_index, {"type": "thinking_delta", "thinking": delta.reasoning}
                )
            )
        if not delta.content:
            return events
        if self.thinking_open:  # the thinking block comes before the text, whole
            self.thinking_open = False
            events.append(_block_stop(self.block_index))
            self.block_index += 1
        if not self.text_open:
            self.text_open = True
            events.append(_block_start(self.block_index, {"type": "text", "text": ""}))
        events.append(_block_delta(self.block_index, {"type": "text_delta", "text": delta.content}))
        return events

    def tool_use_blocks(self) -> list[bytes]:
        """Tool calls go out whole: fragments are merged before their block starts."""
        events: list[bytes] = []
        for block in anthropic_content("", self.answer.calls) if self.answer.tool_calls else ():
            arguments = block.pop("input")
            block["input"] = {}
            partial = {"type": "input_json_delta", "partial_json": json.dumps(arguments)}
            events += [
                _block_start(self.block_index, block),
                _block_delta(self.block_index, partial),
                _block_stop(self.block_index),
            ]
            self.block_index += 1
        return events

    def finish(self) -> list[bytes]:
        """The open block closed, the tool calls, and the message's end."""
        events: list[bytes] = []
        if self.text_open or self.thinking_open:
            events.append(_block_stop(self.block_index))
            self.block_index += 1
        events += self.tool_use_blocks()
        if self.block_index == 0:
            # Anthropic always answers with at least one (possibly empty) text block.
            events += [_block_start(0, {"type": "text", "text": ""}), _block_stop(0)]
        stop_reason, stop_sequence = stop_of(self.answer, self.stop_sequences)
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": anthropic_usage(self.answer.usage),
        }
        events.append(encode_event("message_delta", message_delta))
        events.append(encode_event("message_stop", {"type": "message_stop"}))
        return events
