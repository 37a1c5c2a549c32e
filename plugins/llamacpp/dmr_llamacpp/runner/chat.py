"""Chat templates (GGUF or packaged `template.jinja`) and tool calls through a JSON grammar."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

__all__ = ["ChatTemplate", "ToolPlan", "parse_tool_output", "plan_tools", "schema_grammar"]

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str, eos_token: str) -> None:
        self.source = source or CHATML
        self.bos_token = bos_token
        self.eos_token = eos_token
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent
        )
        self._template = environment.from_string(self.source)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """`extra` is the request's `chat_template_kwargs` (Qwen3's `enable_thinking`)."""

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        try:
            return self._template.render(
                {
                    **(extra or {}),  # the request's own variables never replace these
                    "messages": messages,
                    "tools": tools,
                    "add_generation_prompt": True,
                    "bos_token": self.bos_token,
                    "eos_token": self.eos_token,
                    "raise_exception": raise_exception,
                    "strftime_now": lambda fmt: datetime.now().strftime(fmt),
                }
            )
        except jinja2.TemplateError as error:
            raise ValueError(f"the chat template failed: {error}") from None


def schema_grammar(schema: dict[str, Any] | None) -> str:
    """GBNF for a JSON schema (any JSON object when there is none)."""
    if not schema:
        return JSON_GBNF
    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as error:
        raise ValueError(f"unsupported JSON schema: {error}") from None


class ToolPlan:
    """What a tools request adds: a system instruction and the grammar its answer must follow."""

    def __init__(self, instruction: str, grammar: str) -> None:
        self.instruction = instruction
        self.grammar = grammar


def plan_tools(tools: list[dict[str, Any]], tool_choice: Any) -> ToolPlan | None:
    """llama.cpp's generic tool format: answer `{"tool_call": ...}` or `{"response": ...}`."""
    if tool_choice == "none" or not tools:
        return None
    functions = [tool["function"] for tool in tools if tool.get("type") == "function"]
    if isinstance(tool_choice, dict):
        wanted = tool_choice.get("function", {}).get("name")
        functions = [function for function in functions if function.get("name") == wanted]
        if not functions:
            raise ValueError(f"tool_choice names an unknown function {wanted!r}")
    call_schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "const": function["name"]},
                "arguments": function.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for function in functions
    ]
    call = call_schemas[0] if len(call_schemas) == 1 else {"anyOf": call_schemas}
    options: list[dict[str, Any]] = [
        {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"]}
    ]
    if tool_choice in (None, "auto"):
        options.append(
            {
                "type": "object",
                "properties": {"response": {"type": "string"}},
                "required": ["response"],
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    instruction = (
        "You can call these tools:\n"
        + json.dumps(functions, indent=2)
        + "\n\nRespond in JSON format, either with `tool_call` (a request to call a tool) or "
        "with `response` (a reply to the user's request), following this schema:\n"
        + json.dumps(schema, indent=2)
    )
    if len(options) == 1:
        instruction = instruction.replace(
            "either with `tool_call` (a request to call a tool) or with `response` "
            "(a reply to the user's request)",
            "with `tool_call`",
        )
    return ToolPlan(instruction, schema_grammar(schema))


def parse_tool_output(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) from a generic-format answer; plain text stays content."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return text, []
    if isinstance(answer, dict) and isinstance(answer.get("tool_call"), dict):
        call = answer["tool_call"]
        return None, [
            {
                "name": str(call.get("name", "")),
                "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False),
            }
        ]
    if isinstance(answer, dict) and isinstance(answer.get("response"), str):
        return answer["response"], []
    return text, []


def add_instruction(messages: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    """Messages with `instruction` appended to (or as) the system message."""
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{instruction}".strip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]
