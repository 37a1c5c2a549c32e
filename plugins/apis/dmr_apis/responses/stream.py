"""A streamed Responses answer: the runner's chat stream, written as the Responses API's
events (`response.created`, output items, text deltas, `response.completed`).

The stream's state (the sequence number, which items are open, the output so far)
lives on one `ResponseStream` per request, each step a plain method.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from typing import Any

from dmr_apis.common.answer_fold import AnswerFold, TextDelta
from dmr_apis.common.streaming import encode_event
from dmr_apis.common.tool_calls import ToolCall
from dmr_apis.responses.translate import (
    function_call_item,
    message_item,
    new_id,
    reasoning_item,
    response_object,
    usage_of,
)

__all__ = ["ResponseStream", "finish_status"]


def finish_status(finish_reason: str | None, calls: list[ToolCall]) -> tuple[str, str | None]:
    """The response's status and, when incomplete, why."""
    if finish_reason == "length" and not calls:
        return "incomplete", "max_output_tokens"
    return "completed", None


class ResponseStream:
    """The events of one streamed response. The reasoning item, when the model thinks,
    comes first (output index 0) and closes when the answer's text starts; the message
    item follows; function calls go out whole once all of their fragments arrived."""

    def __init__(
        self,
        body: Mapping[str, Any],
        *,
        response_id: str,
        created_at: int,
        remember: Callable[[dict[str, Any]], None],
    ) -> None:
        self.body = body
        self.response_id = response_id
        self.created_at = created_at
        self.remember = remember
        self.sequence = 0
        self.message_id = new_id("msg")
        self.reasoning_id = new_id("rs")
        self.answer = AnswerFold()
        self.output: list[dict[str, Any]] = []
        self.item_open = False
        self.reasoning_open = False
        self.message_index = 0  # after the reasoning item, when there is one

    async def events(self, chunks: AsyncIterable[Mapping[str, Any]]) -> AsyncIterator[bytes]:
        """Every event of the response, from the runner's chat stream `chunks`."""
        pending = self.response("in_progress", [])
        yield self.event("response.created", response=pending)
        yield self.event("response.in_progress", response=pending)
        try:
            async for delta in self.answer.deltas(chunks):
                for event in self.on_delta(delta):
                    yield event
        except Exception as error:  # the stream broke after the 200 went out
            failed = self.response("failed", [])
            failed["error"] = {"code": "server_error", "message": str(error)}
            yield self.event("response.failed", response=failed)
            return
        for event in self.finish():
            yield event

    def event(self, kind: str, **fields: Any) -> bytes:
        """One event, numbered in the order it is made."""
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return encode_event(kind, data)

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        incomplete_reason: str | None = None,
    ) -> dict[str, Any]:
        return response_object(
            self.body,
            response_id=self.response_id,
            created_at=self.created_at,
            status=status,
            output=output,
            usage=usage,
            incomplete_reason=incomplete_reason,
        )

    def on_delta(self, delta: TextDelta) -> list[bytes]:
        """Thinking streams as a reasoning item, closed when the answer starts."""
        events: list[bytes] = []
        if delta.reasoning and not self.item_open:
            if not self.reasoning_open:
                self.reasoning_open = True
                events += self.open_reasoning()
            events.append(
                self.event(
                    "response.reasoning_text.delta",
                    item_id=self.reasoning_id,
                    output_index=0,
                    content_index=0,
                    delta=delta.reasoning,
                )
            )
        if not delta.content:
            return events
        if not self.item_open:
            if self.reasoning_open:
                events += self.close_reasoning()
                self.message_index = 1
            self.item_open = True
            events += self.open_item()
        events.append(
            self.event(
                "response.output_text.delta",
                item_id=self.message_id,
                output_index=self.message_index,
                content_index=0,
                delta=delta.content,
                logprobs=[],
            )
        )
        return events

    def open_item(self) -> list[bytes]:
        """The message item's opening events (sequence numbers taken in order)."""
        added = self.event(
            "response.output_item.added",
            output_index=self.message_index,
            item=message_item(self.message_id, "", status="in_progress"),
        )
        part = self.event(
            "response.content_part.added",
            item_id=self.message_id,
            output_index=self.message_index,
            content_index=0,
            part={"type": "output_text", "text": "", "annotations": []},
        )
        return [added, part]

    def open_reasoning(self) -> list[bytes]:
        added = self.event(
            "response.output_item.added",
            output_index=0,
            item={**reasoning_item(self.reasoning_id, ""), "content": []},
        )
        part = self.event(
            "response.content_part.added",
            item_id=self.reasoning_id,
            output_index=0,
            content_index=0,
            part={"type": "reasoning_text", "text": ""},
        )
        return [added, part]

    def close_reasoning(self) -> list[bytes]:
        """The reasoning item's closing events; it goes first in `output`."""
        text = self.answer.reasoning
        item = reasoning_item(self.reasoning_id, text)
        self.output.append(item)
        return [
            self.event(
                "response.reasoning_text.done",
                item_id=self.reasoning_id,
                output_index=0,
                content_index=0,
                text=text,
            ),
            self.event(
                "response.content_part.done",
                item_id=self.reasoning_id,
                output_index=0,
                content_index=0,
                part={"type": "reasoning_text", "text": text},
            ),
            self.event("response.output_item.done", output_index=0, item=item),
        ]

    def close_message(self) -> list[bytes]:
        """The message item's closing events, opening it first if no text came."""
        events = [] if self.item_open else self.open_item()
        text = self.answer.content
        part = {"type": "output_text", "text": text, "annotations": []}
        events.append(
            self.event(
                "response.output_text.done",
                item_id=self.message_id,
                output_index=self.message_index,
                content_index=0,
                text=text,
                logprobs=[],
            )
        )
        events.append(
            self.event(
                "response.content_part.done",
                item_id=self.message_id,
                output_index=self.message_index,
                content_index=0,
                part=part,
            )
        )
        done_item = message_item(self.message_id, text)
        events.append(
            self.event("response.output_item.done", output_index=self.message_index, item=done_item)
        )
        self.output.append(done_item)
        return events

    def function_call(self, call: ToolCall) -> list[bytes]:
        """A function call's item, whole: added, its arguments in one delta, done."""
        index = len(self.output)
        item = function_call_item(call)
        added = {**item, "arguments": "", "status": "in_progress"}
        events = [
            self.event("response.output_item.added", output_index=index, item=added),
            self.event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=index,
                delta=call.arguments,
            ),
            self.event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=call.arguments,
            ),
            self.event("response.output_item.done", output_index=index, item=item),
        ]
        self.output.append(item)
        return events

    def finish(self) -> list[bytes]:
        """The open items closed, the function calls, and the finished response."""
        events: list[bytes] = []
        if self.reasoning_open and not self.item_open:  # thinking, then no text
            events += self.close_reasoning()
            self.message_index = 1
        finished_calls = self.answer.calls
        if self.item_open or not finished_calls:
            events += self.close_message()
        for call in finished_calls:
            events += self.function_call(call)
        status, reason = finish_status(self.answer.finish_reason, finished_calls)
        final = self.response(status, self.output, usage_of(self.answer.usage), reason)
        self.remember(final)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        events.append(self.event(kind, response=final))
        return events
