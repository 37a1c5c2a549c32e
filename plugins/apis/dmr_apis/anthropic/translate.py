"""Pure translation between Anthropic Messages bodies and OpenAI chat bodies."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from dmr.sdk import InvalidRequestError

from dmr_apis.common.answer_fold import cached_prompt_tokens
from dmr_apis.common.body import optional_number
from dmr_apis.common.images import (
    SUPPORTED_MEDIA_TYPES,
    base64_image_url,
    http_image_url,
    image_url_part,
)
from dmr_apis.common.tool_calls import ToolCall, parse_arguments

__all__ = [
    "anthropic_content",
    "anthropic_stop_reason",
    "anthropic_to_openai",
    "anthropic_usage",
    "message_id",
    "openai_messages",
    "openai_tools",
]


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def _text_of(content: Any, where: str, *, images_elsewhere: bool = False) -> str:
    """Text from a string or an array of text blocks (system prompts, tool results).

    `images_elsewhere`: the caller takes the image blocks (a tool result's); else
    one is a 400 rather than dropped unseen.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where} must be a string or an array of content blocks")
    parts = []
    for block in content:
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise InvalidRequestError(f"{where}: each content block must be an object with a type")
        if block["type"] == "text":
            if not isinstance(block.get("text"), str):
                raise InvalidRequestError(f"{where}: a text block needs a string 'text'")
            parts.append(block["text"])
        elif block["type"] == "image" and not images_elsewhere:
            raise InvalidRequestError(f"{where}: image blocks are not supported here")
    return "\n".join(parts)


def _image_part(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    """An `image` block as an OpenAI `image_url` part; `where` is Anthropic's error path
    (`messages.0.content.1.image`)."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise InvalidRequestError(f"{where}.source: an image block needs a 'source' object")
    kind = source.get("type")
    if kind == "base64":
        media_type = source.get("media_type")
        if media_type not in SUPPORTED_MEDIA_TYPES:
            allowed = ", ".join(f"'{name}'" for name in SUPPORTED_MEDIA_TYPES[:-1])
            raise InvalidRequestError(
                f"{where}.source.base64.media_type: Input should be {allowed} "
                f"or '{SUPPORTED_MEDIA_TYPES[-1]}'"
            )
        data = source.get("data")
        if not isinstance(data, str):
            raise InvalidRequestError(f"{where}.source.base64.data: Input should be a string")
        url = base64_image_url(data, f"{where}.source.base64.data", media_type=media_type)
    elif kind == "url":
        if not isinstance(source.get("url"), str):
            raise InvalidRequestError(f"{where}.source.url.url: Input should be a string")
        url = http_image_url(source["url"], f"{where}.source.url.url")
    elif kind == "file":
        raise InvalidRequestError(
            f"{where}.source: file sources (the Files API) are not supported; "
            "send the image as base64 or url"
        )
    else:
        raise InvalidRequestError(f"{where}.source.type: Input should be 'base64' or 'url'")
    return image_url_part(url)


def openai_messages(system: Any, messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array")
    converted: list[dict[str, Any]] = []
    system_text = _text_of(system, "'system'")
    if system_text:
        converted.append({"role": "system", "content": system_text})
    for position, message in enumerate(messages):
        where = f"messages.{position}"
        if not isinstance(message, dict):
            raise InvalidRequestError(f"{where} must be an object")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise InvalidRequestError(f"{where}.role must be 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, str):
            converted.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidRequestError(f"{where}.content must be a string or an array of blocks")
        parts: list[dict[str, Any]] = []
        tool_calls: list[dict[str, Any]] = []
        for index, block in enumerate(content):
            block_where = f"{where}.content.{index}"
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise InvalidRequestError(f"{block_where} must be an object with a 'type'")
            kind = block["type"]
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    raise InvalidRequestError(f"{block_where}.text must be a string")
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image":
                parts.append(_image_part(block, f"{block_where}.image"))
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("name"), str):
                    raise InvalidRequestError(f"{block_where}.name must be a string")
                tool_calls.append(
                    {
                        "id": block.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                        "type": "function",
                        "function": {
                            "name": block["name"],
                            "arguments": json.dumps(block.get("input") or {}),
                        },
                    }
                )
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise InvalidRequestError(f"{block_where}.tool_use_id must be a string")
                result = block.get("content")
                text = _text_of(result, f"{block_where}.content", images_elsewhere=True)
                # OpenAI tool messages hold text only: a result's images (a screenshot,
                # a file read) go to the model in the user turn that follows them.
                parts += [
                    _image_part(item, f"{block_where}.tool_result.content.{number}.image")
                    for number, item in enumerate(result if isinstance(result, list) else [])
                    if item["type"] == "image"
                ]
                if block.get("is_error"):
                    text = f"Error: {text}"
                # OpenAI wants tool results as their own messages, before the user's text.
                converted.append(
                    {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}
                )
            elif kind in ("thinking", "redacted_thinking"):
                continue  # the model's own reasoning is not fed back
            else:
                raise InvalidRequestError(f"{block_where}: unsupported block type {kind!r}")
        if tool_calls:
            text = "".join(part["text"] for part in parts if part["type"] == "text")
            converted.append(
                {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
            )
        elif parts:
            if all(part["type"] == "text" for part in parts):
                converted.append({"role": role, "content": "".join(part["text"] for part in parts)})
            else:
                converted.append({"role": role, "content": parts})
    return converted


def openai_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidRequestError("'tools' must be an array")
    converted = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequestError(f"tools.{index} must be an object with a string 'name'")
        schema = tool.get("input_schema", {"type": "object", "properties": {}})
        if not isinstance(schema, dict):
            raise InvalidRequestError(f"tools.{index}.input_schema must be an object")
        if tool.get("type") not in (None, "custom"):
            raise InvalidRequestError(
                f"tools.{index}: server tool {tool.get('type')!r} is not supported"
            )
        function: dict[str, Any] = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        converted.append({"type": "function", "function": function})
    return converted or None


def _tool_choice(choice: Any) -> Any:
    if choice is None:
        return None
    if not isinstance(choice, dict):
        raise InvalidRequestError("'tool_choice' must be an object")
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequestError("'tool_choice.type' must be auto, any, tool or none")


def anthropic_to_openai(body: Mapping[str, Any], *, stream: bool) -> dict[str, Any]:
    max_tokens = optional_number(body, "max_tokens", integer=True)
    if max_tokens is None:
        raise InvalidRequestError("'max_tokens' is required")
    if max_tokens < 1:
        raise InvalidRequestError("'max_tokens' must be at least 1")
    payload: dict[str, Any] = {
        "model": body["model"],
        "messages": openai_messages(body.get("system"), body.get("messages")),
        "max_tokens": max_tokens,
        "stream": stream,
    }
    for field in ("temperature", "top_p"):
        value = optional_number(body, field)
        if value is not None:
            payload[field] = value
    top_k = optional_number(body, "top_k", integer=True)
    if top_k is not None:
        payload["top_k"] = top_k
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidRequestError("'stop_sequences' must be an array of strings")
        if stops:
            payload["stop"] = stops
    tools = openai_tools(body.get("tools"))
    if tools:
        payload["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"))
        if choice is not None:
            payload["tool_choice"] = choice
    fmt = _output_format(body.get("output_config"))
    if fmt is not None:
        payload["response_format"] = fmt
    payload.update(_thinking(body.get("thinking")))
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


def _thinking(thinking: Any) -> dict[str, Any]:
    """Anthropic's `thinking` in the runner's terms: disabled is llama-server's (and
    vLLM's) `enable_thinking: false`; a `budget_tokens` is dmr's `reasoning_budget`,
    the per-request `--reasoning-budget` of the llama.cpp runner."""
    if thinking is None:
        return {}
    if not isinstance(thinking, Mapping) or thinking.get("type") not in ("enabled", "disabled"):
        raise InvalidRequestError('\'thinking\' must be {"type": "enabled"|"disabled"}')
    if thinking["type"] == "disabled":
        return {"chat_template_kwargs": {"enable_thinking": False}}
    budget = thinking.get("budget_tokens")
    if budget is None:
        return {}
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise InvalidRequestError("'thinking.budget_tokens' must be a positive integer")
    return {"reasoning_budget": budget}


def _output_format(output_config: Any) -> dict[str, Any] | None:
    """Structured outputs (`output_config.format` JSON schema) as OpenAI `response_format`."""
    if output_config is None:
        return None
    if not isinstance(output_config, dict):
        raise InvalidRequestError("'output_config' must be an object")
    fmt = output_config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise InvalidRequestError("'output_config.format' must be a json_schema format")
    if not isinstance(fmt.get("schema"), dict):
        raise InvalidRequestError("'output_config.format.schema' must be an object")
    return {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True},
    }


def anthropic_stop_reason(
    finish_reason: str | None, *, matched_stop: Any, stop_sequences: Any
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) from OpenAI's finish_reason."""
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason in ("tool_calls", "function_call"):
        return "tool_use", None
    if (
        isinstance(matched_stop, str)
        and isinstance(stop_sequences, list)
        and matched_stop in stop_sequences
    ):
        return "stop_sequence", matched_stop
    return "end_turn", None


def anthropic_usage(usage: Mapping[str, Any] | None) -> dict[str, int]:
    """Anthropic counts cache reads apart: input_tokens + cache_read_input_tokens is the prompt."""
    usage = usage or {}
    cached = cached_prompt_tokens(usage)
    return {
        "input_tokens": max(int(usage.get("prompt_tokens") or 0) - cached, 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": int(usage.get("completion_tokens") or 0),
    }


def anthropic_content(
    text: str, tool_calls: list[ToolCall], thinking: str = ""
) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if thinking:  # the model's reasoning (`reasoning_content`); dmr signs nothing
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if text or not tool_calls:
        content.append({"type": "text", "text": text})
    for call in tool_calls:
        content.append(
            {
                "type": "tool_use",
                "id": call.id if call.id.startswith("toolu_") else f"toolu_{call.id}",
                "name": call.name,
                "input": parse_arguments(call.arguments),
            }
        )
    return content
