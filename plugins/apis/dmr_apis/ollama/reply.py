"""An Ollama chat or generate answer: the runner's OpenAI answer, streamed or whole,
written as Ollama's lines (`message` or `response`, then a last line with the stats).

One `GenerationReply` per request keeps what every line repeats (the model's name, the
route's shape, when the request started), each line a plain method.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

from dmr_apis.common.answer_fold import AnswerFold
from dmr_apis.common.streaming import ndjson_line
from dmr_apis.ollama.translate import (
    final_stats,
    iso_time,
    ollama_done_reason,
    ollama_tool_calls,
)

__all__ = ["GenerationReply"]


class GenerationReply:
    """`route` picks the shape: "chat" answers with a `message`, "generate" with a
    `response`; `started` is the request's `time.monotonic()` start, for the stats."""

    def __init__(self, *, model: Any, route: str, started: float) -> None:
        self.model = model
        self.route = route
        self.started = started

    def chunk(self, content: str, thinking: str | None = None) -> dict[str, Any]:
        """One line of text as it arrives (`done` false)."""
        line: dict[str, Any] = {"model": self.model, "created_at": iso_time()}
        if self.route == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            line["message"] = message
        else:
            line["response"] = content
            if thinking:
                line["thinking"] = thinking
        line["done"] = False
        return line

    def final(
        self, line: dict[str, Any], answer: AnswerFold, load_seconds: float
    ) -> dict[str, Any]:
        """`line` made the last one: tool calls, why it stopped, and the stats."""
        if answer.tool_calls and self.route == "chat":
            # Sent whole, once every fragment has arrived.
            line["message"]["tool_calls"] = ollama_tool_calls(answer.calls)
        line["done"] = True
        line["done_reason"] = ollama_done_reason(answer.finish_reason)
        line.update(
            final_stats(
                total_seconds=time.monotonic() - self.started,
                load_seconds=load_seconds,
                timings=answer.timings,
                usage=answer.usage,
            )
        )
        return line

    def whole(self, answer: AnswerFold, load_seconds: float) -> dict[str, Any]:
        """The one reply of a request with `stream: false`."""
        return self.final(self.chunk(answer.content, answer.reasoning), answer, load_seconds)

    async def lines(
        self, chunks: AsyncIterable[Mapping[str, Any]], load_seconds: float
    ) -> AsyncIterator[bytes]:
        """The streamed reply's NDJSON lines, from the runner's stream `chunks`."""
        answer = AnswerFold()
        try:
            async for delta in answer.deltas(chunks):
                yield ndjson_line(self.chunk(delta.content, delta.reasoning))
        except Exception as error:  # the stream broke after the 200 went out
            yield ndjson_line({"error": str(error)})
            return
        yield ndjson_line(self.final(self.chunk(""), answer, load_seconds))
