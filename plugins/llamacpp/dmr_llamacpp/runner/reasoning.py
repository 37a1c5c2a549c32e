"""A reasoning model's thinking, split from its answer as llama-server's default
`--reasoning-format deepseek` does: text between `<think>` and `</think>` (as
DeepSeek-R1 and Qwen3 write it) is `reasoning_content`, the rest `content`.

`ReasoningSplitter` works on the streamed text deltas; `ThinkingBudget` is what the
decode loop needs to cut thinking short (`--reasoning-budget`, runner/batching.py).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "THINK_CLOSE",
    "THINK_OPEN",
    "ReasoningSplitter",
    "ThinkingBudget",
    "partial_tag",
    "starts_thinking",
]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def starts_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside thinking (templates such as
    DeepSeek-R1's end with `<think>`, so the model only ever writes the close tag)."""
    return prompt.rstrip().endswith(THINK_OPEN)


def partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of `text` could start `tag` (held for the next delta)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ReasoningSplitter:
    """Splits text deltas into (reasoning, content), a tag possibly cut across deltas.

    The common case, a model that never thinks, costs one substring test per delta:
    text without `<` outside thinking is content as it is.
    """

    __slots__ = ("_held", "_trim", "inside")

    def __init__(self, *, thinking: bool = False) -> None:
        self.inside = thinking
        self._held = ""  # the start of a tag, not yet known to be one
        # After a tag the newlines around it are layout, not text (llama-server trims them).
        self._trim = thinking

    def push(self, text: str) -> tuple[str, str]:
        if not self.inside and not self._held and not self._trim and "<" not in text:
            return "", text
        text = self._held + text
        self._held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            tag = THINK_CLOSE if self.inside else THINK_OPEN
            at = text.find(tag)
            if at >= 0:
                piece, text = text[:at], text[at + len(tag) :]
            else:
                keep = partial_tag(text, tag)
                piece, self._held, text = text[: len(text) - keep], text[len(text) - keep :], ""
            self._add(piece, reasoning if self.inside else content)
            if at >= 0:
                self.inside = not self.inside
                self._trim = True
            else:
                break
        return "".join(reasoning), "".join(content)

    def _add(self, piece: str, side: list[str]) -> None:
        if self._trim:
            piece = piece.lstrip()
            if not piece:
                return
            self._trim = False
        side.append(piece)

    def finish(self) -> tuple[str, str]:
        """What is still held at the end (a `<thi` that never became a tag)."""
        held, self._held = self._held, ""
        if not held:
            return "", ""
        return (held, "") if self.inside else ("", held)


@dataclass(frozen=True)
class ThinkingBudget:
    """A request's limit on thinking tokens, for the decode loop.

    `tokens` is the budget (0: close the thinking at once); `close` the tokens of
    `</think>` and the blank line after it, forced once the budget is spent;
    `inside` whether the prompt already opened the thinking.
    """

    tokens: int
    close: tuple[int, ...]
    inside: bool = False
