"""Reading a runner's OpenAI answer, streamed chunk by chunk or whole, in one place.

The translating dialects (Anthropic, Ollama, Responses) need the same things from
an answer: its text as it arrives, whole tool calls from their fragments, the
finish reason, the matched stop string, usage and llama-server's timings.
`AnswerFold` reads them; each dialect only writes its own events from it. Delta
fields are read in `AnswerFold.add` alone and carried on `TextDelta`: the
model's thinking (`reasoning_content`) already is, for Ollama's `thinking`, so a
dialect that starts to send thinking reads `TextDelta.reasoning`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from dmr_apis.common.tool_calls import ToolCall, ToolCallAccumulator

__all__ = ["AnswerFold", "TextDelta", "cached_prompt_tokens", "fold_answer"]


@dataclass(frozen=True)
class TextDelta:
    """The text one choice of one chunk adds: answer text and the model's thinking
    (`reasoning_content`, which only some runners send)."""

    content: str
    reasoning: str = ""


@dataclass
class AnswerFold:
    """An OpenAI chat or text completion, folded from its stream chunks as they come."""

    tool_calls: ToolCallAccumulator = field(default_factory=ToolCallAccumulator)
    finish_reason: str | None = None
    # vLLM reports the matched stop string as a choice's `stop_reason`;
    # llama-server as the chunk's `stopping_word`.
    matched_stop: Any = None
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    _content: list[str] = field(default_factory=list, init=False, repr=False)
    _reasoning: list[str] = field(default_factory=list, init=False, repr=False)

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def calls(self) -> list[ToolCall]:
        """The tool calls, whole, in the order the model made them."""
        return self.tool_calls.finished()

    def add(self, chunk: Mapping[str, Any]) -> list[TextDelta]:
        """Fold one chunk; the text of each of its choices that has some."""
        texts: list[TextDelta] = []
        self.usage = chunk.get("usage") or self.usage
        self.timings = chunk.get("timings") or self.timings
        self.matched_stop = chunk.get("stopping_word") or self.matched_stop
        for choice in chunk.get("choices") or ():
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            self.matched_stop = choice.get("stop_reason") or self.matched_stop
            delta = choice.get("delta")
            if isinstance(delta, Mapping):  # a chat completion
                self.tool_calls.add(delta.get("tool_calls"))
                text = TextDelta(delta.get("content") or "", delta.get("reasoning_content") or "")
            else:  # a text completion
                text = TextDelta(choice.get("text") or "")
            if text.content or text.reasoning:
                self._content.append(text.content)
                self._reasoning.append(text.reasoning)
                texts.append(text)
        return texts

    async def deltas(self, chunks: AsyncIterable[Mapping[str, Any]]) -> AsyncIterator[TextDelta]:
        """The text of a stream as it arrives, the rest of each chunk folded on the way."""
        async for chunk in chunks:
            for text in self.add(chunk):
                yield text


def fold_answer(body: Mapping[str, Any]) -> AnswerFold:
    """A whole (non-streamed) answer, read as one chunk whose delta is the first
    choice's message (a tool call's place in the list is its stream index)."""
    choice: Mapping[str, Any] = (body.get("choices") or [{}])[0]
    message = choice.get("message")
    if message is not None:
        choice = {**choice, "delta": message}
    fold = AnswerFold()
    fold.add({**body, "choices": [choice]})
    return fold


def cached_prompt_tokens(usage: Mapping[str, Any]) -> int:
    """OpenAI's `prompt_tokens_details.cached_tokens`: prompt tokens reused from a cache."""
    details = usage.get("prompt_tokens_details")
    return int((details.get("cached_tokens") if isinstance(details, Mapping) else 0) or 0)
