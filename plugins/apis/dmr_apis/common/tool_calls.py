"""Collecting streamed OpenAI tool-call fragments into whole tool calls."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ToolCall", "ToolCallAccumulator", "parse_arguments"]


@dataclass
class ToolCall:
    id: str
    name: str = ""
    arguments: str = ""

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def parse_arguments(arguments: str | dict[str, Any] | None) -> dict[str, Any]:
    """Tool arguments as an object; a model that writes broken JSON gets `{}`
    rather than failing the whole reply (small models often do)."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


@dataclass
class ToolCallAccumulator:
    """Streamed `delta.tool_calls` arrive as fragments keyed by index; Ollama and
    Anthropic clients want each call whole, so fragments are merged here."""

    calls: dict[int, ToolCall] = field(default_factory=dict)

    def add(self, fragments: list[dict[str, Any]] | None) -> None:
        for position, fragment in enumerate(fragments or ()):
            index = fragment.get("index", position)
            call = self.calls.get(index)
            if call is None:
                call = ToolCall(id=fragment.get("id") or f"call_{uuid.uuid4().hex[:24]}")
                self.calls[index] = call
            elif fragment.get("id"):
                call.id = fragment["id"]
            function = fragment.get("function") or {}
            if function.get("name"):
                call.name += function["name"]
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call.arguments += arguments
            elif isinstance(arguments, dict):
                call.arguments += json.dumps(arguments)

    def finished(self) -> list[ToolCall]:
        return [self.calls[index] for index in sorted(self.calls)]

    def __bool__(self) -> bool:
        return bool(self.calls)
