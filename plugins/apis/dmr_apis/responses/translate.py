"""Pure translation between OpenAI Responses bodies and chat-completions bodies."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from dmr.sdk import InvalidRequestError

from dmr_apis.common.answer_fold import cached_prompt_tokens
from dmr_apis.common.body import optional_number
from dmr_apis.common.images import checked_image_url, image_url_part
from dmr_apis.common.tool_calls import ToolCall

__all__ = [
    "UNSUPPORTED_TOOL_TYPES",
    "chat_payload",
    "input_items",
    "items_to_messages",
    "new_id",
    "output_items",
    "response_object",
    "usage_of",
]

UNSUPPORTED_TOOL_TYPES = frozenset(
    {
        "web_search",
        "web_search_preview",
        "file_search",
        "code_interpreter",
        "computer_use_preview",
        "computer_use",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
    }
)
# Request fields dmr cannot honour; silently ignoring them would mislead the client.
_UNSUPPORTED_FIELDS = {
    "background": "background responses are not supported",
    "conversation": "'conversation' objects are not supported; use previous_response_id",
    "prompt": "stored prompt templates are not supported",
}
_ROLES = ("user", "assistant", "system", "developer")
_IMAGE_DETAILS = ("auto", "low", "high")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def check_supported(body: Mapping[str, Any]) -> None:
    for field, reason in _UNSUPPORTED_FIELDS.items():
        value = body.get(field)
        if value not in (None, False):
            raise InvalidRequestError(f"'{field}': {reason}")
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequestError("'tools' must be an array")
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidRequestError(f"tools[{index}] must be an object")
        kind = tool.get("type")
        if kind in UNSUPPORTED_TOOL_TYPES:
            raise InvalidRequestError(
                f"tools[{index}]: built-in tool {kind!r} is not supported; "
                "only 'function' tools are"
            )
        if kind != "function":
            raise InvalidRequestError(f"tools[{index}]: unsupported tool type {kind!r}")
        if not isinstance(tool.get("name"), str):
            raise InvalidRequestError(f"tools[{index}].name must be a string")


def input_items(raw_input: Any) -> list[dict[str, Any]]:
    """The request's `input` as a list of items, each given an id (for input_items)."""
    if isinstance(raw_input, str):
        items: list[Any] = [{"type": "message", "role": "user", "content": raw_input}]
    elif isinstance(raw_input, list):
        items = raw_input
    else:
        raise InvalidRequestError("'input' must be a string or an array of input items")
    normalised = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidRequestError(f"input[{index}] must be an object")
        item = dict(item)
        kind = item.setdefault("type", "message")
        if kind == "message":
            if item.get("role") not in _ROLES:
                raise InvalidRequestError(f"input[{index}].role must be one of {', '.join(_ROLES)}")
            content = item.get("content")
            if isinstance(content, str):
                item["content"] = [
                    {
                        "type": "output_text" if item["role"] == "assistant" else "input_text",
                        "text": content,
                    }
                ]
            elif not isinstance(content, list):
                raise InvalidRequestError(f"input[{index}].content must be a string or array")
            item.setdefault("id", new_id("msg"))
        elif kind == "function_call":
            for field in ("call_id", "name", "arguments"):
                if not isinstance(item.get(field), str):
                    raise InvalidRequestError(f"input[{index}].{field} must be a string")
            item.setdefault("id", new_id("fc"))
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise InvalidRequestError(f"input[{index}].call_id must be a string")
            if not isinstance(item.get("output"), str | list):
                raise InvalidRequestError(f"input[{index}].output must be a string")
            item.setdefault("id", new_id("fco"))
        elif kind in ("reasoning", "item_reference"):
            raise InvalidRequestError(f"input[{index}]: '{kind}' items are not supported")
        else:
            raise InvalidRequestError(f"input[{index}]: unknown item type {kind!r}")
        normalised.append(item)
    return normalised


def _input_image(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    """An `input_image` part (a data or http(s) URL) as an OpenAI chat `image_url` part."""
    if part.get("file_id") is not None:
        raise InvalidRequestError(
            f"{where}.file_id: uploaded files are not supported; "
            "send image_url as a data: or http(s) URL"
        )
    url = part.get("image_url")
    if not isinstance(url, str):
        raise InvalidRequestError(f"{where}.image_url must be a string (a data: or http(s) URL)")
    detail = part.get("detail")
    if detail is not None and detail not in _IMAGE_DETAILS:
        raise InvalidRequestError(f"{where}.detail must be one of {', '.join(_IMAGE_DETAILS)}")
    return image_url_part(checked_image_url(url, f"{where}.image_url"), detail)


def _content_parts(content: list[Any], where: str) -> list[dict[str, Any]]:
    parts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            raise InvalidRequestError(f"{where}.content[{index}] must be an object")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            if not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"{where}.content[{index}].text must be a string")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            parts.append(_input_image(part, f"{where}.content[{index}]"))
        else:
            raise InvalidRequestError(f"{where}.content[{index}]: unsupported part {kind!r}")
    return parts


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        kind = item["type"]
        if kind == "message":
            parts = _content_parts(item["content"], f"input[{index}]")
            role = "system" if item["role"] == "developer" else item["role"]
            if all(part["type"] == "text" for part in parts):
                messages.append({"role": role, "content": "".join(part["text"] for part in parts)})
            else:
                messages.append({"role": role, "content": parts})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            previous = messages[-1] if messages else None
            if previous and previous["role"] == "assistant" and "tool_calls" in previous:
                previous["tool_calls"].append(call)  # parallel calls share one message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item["output"]
            if isinstance(output, list):
                output = "".join(part.get("text", "") for part in output if isinstance(part, dict))
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
    return messages


def _text_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise InvalidRequestError("'text' must be an object")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequestError("'text.format' must be an object")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequestError("'text.format.schema' must be an object")
        return {
            "type": "json_schema",
            "json_schema": {
                "name": fmt.get("name") or "response",
                "schema": fmt["schema"],
                "strict": bool(fmt.get("strict", True)),
            },
        }
    raise InvalidRequestError("'text.format.type' must be text, json_object or json_schema")


def _tool_choice(choice: Any) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise InvalidRequestError("'tool_choice' must be auto, none, required or a function")


def chat_payload(
    body: Mapping[str, Any], messages: list[dict[str, Any]], *, stream: bool
) -> dict[str, Any]:
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequestError("'instructions' must be a string")
    full = ([{"role": "system", "content": instructions}] if instructions else []) + messages
    payload: dict[str, Any] = {"model": body["model"], "messages": full, "stream": stream}
    max_tokens = optional_number(body, "max_output_tokens", integer=True)
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    for field in ("temperature", "top_p"):
        value = optional_number(body, field)
        if value is not None:
            payload[field] = value
    seed = optional_number(body, "seed", integer=True)
    if seed is not None:
        payload["seed"] = seed
    fmt = _text_format(body.get("text"))
    if fmt is not None:
        payload["response_format"] = fmt
    tools = body.get("tools") or []
    if tools:
        payload["tools"] = [
            {
                "type": "function",
                "function": {
                    key: tool[key]
                    for key in ("name", "description", "parameters", "strict")
                    if key in tool
                },
            }
            for tool in tools
        ]
        choice = _tool_choice(body.get("tool_choice"))
        if choice is not None:
            payload["tool_choice"] = choice
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]
        if status == "completed"
        else [],
    }


def function_call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": new_id("fc"),
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if status == "completed" else "",
        "status": status,
    }


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    """The runner's `reasoning_content` as OpenAI's reasoning item (`reasoning_text`
    content, as OpenAI's open-weight models return it; no summary is made)."""
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def output_items(
    text: str, calls: list[ToolCall], message_id: str | None = None, reasoning: str = ""
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if reasoning:
        items.append(reasoning_item(new_id("rs"), reasoning))
    if text or not calls:
        items.append(message_item(message_id or new_id("msg"), text))
    items.extend(function_call_item(call) for call in calls)
    return items


def output_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The response's output as chat messages, for the next turn's conversation."""
    text = "".join(
        part["text"]
        for item in items
        if item["type"] == "message"
        for part in item["content"]
        if part.get("type") == "output_text"
    )
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in items
        if item["type"] == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return [message]


def usage_of(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached_prompt_tokens(usage)},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def response_object(
    body: Mapping[str, Any],
    *,
    response_id: str,
    created_at: int | None = None,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    incomplete_reason: str | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at or int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body["model"],
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True) is not False,
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation") or "disabled",
        "usage": usage,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
