"""Pure translation between Ollama's `/api` bodies and OpenAI's (runner) bodies."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from dmr.sdk import InvalidRequestError
from dmr.sdk.dialect import parse_duration

from dmr_apis.common.images import base64_image_url, checked_image_url, image_url_part
from dmr_apis.common.tool_calls import ToolCall, parse_arguments

__all__ = [
    "OllamaRequestOptions",
    "final_stats",
    "iso_time",
    "ollama_done_reason",
    "ollama_image_parts",
    "ollama_messages_to_openai",
    "ollama_tool_calls",
    "options_to_openai",
    "parse_keep_alive",
    "response_format",
    "user_content",
]

# Ollama option -> OpenAI/llama-server sampling field (same meaning, same units).
_NUMERIC_OPTIONS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_last_n": "repeat_last_n",  # -1: the whole context, for Ollama as for llama.cpp
    "typical_p": "typical_p",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}
# Options whose values are counts or switches: 64.0 from a client is sent as 64.
_INTEGER_OPTIONS = frozenset({"top_k", "seed", "repeat_last_n", "mirostat"})

OllamaRequestOptions = dict[str, Any]


def iso_time(when: datetime | float | None = None) -> str:
    """RFC 3339 with nanosecond-style precision, as Ollama writes `created_at`."""
    if when is None:
        when = datetime.now(UTC)
    elif not isinstance(when, datetime):
        when = datetime.fromtimestamp(when, UTC)
    return when.isoformat().replace("+00:00", "Z")


def _number(options: Mapping[str, Any], key: str) -> float | int | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"option '{key}' must be a number, not {type(value).__name__}")
    return value


def options_to_openai(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Sampling fields for the runner; `num_ctx` is not one (it configures the runner)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise InvalidRequestError(f"'options' must be an object, not {type(options).__name__}")
    fields: dict[str, Any] = {}
    for option, field in _NUMERIC_OPTIONS.items():
        value = _number(options, option)
        if value is not None:
            fields[field] = int(value) if option in _INTEGER_OPTIONS else value
    num_predict = _number(options, "num_predict")
    # Ollama's -1 (infinite) and -2 (fill context) both mean "no cap" to OpenAI.
    if num_predict is not None and num_predict >= 0:
        fields["max_tokens"] = int(num_predict)
    stop = options.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequestError("option 'stop' must be a string or an array of strings")
        if stop:
            fields["stop"] = stop
    return fields


def num_ctx(options: Mapping[str, Any] | None) -> int | None:
    if not options:
        return None
    value = _number(options, "num_ctx")
    return int(value) if value is not None and value > 0 else None


def parse_keep_alive(value: Any) -> float | None:
    """Seconds from a Go duration ("5m"), a number of seconds, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidRequestError("'keep_alive' must be a duration string or a number")
    try:
        return parse_duration(value)
    except ValueError as error:
        raise InvalidRequestError(f"invalid 'keep_alive': {error}") from None


def response_format(fmt: Any) -> dict[str, Any] | None:
    """Ollama `format` ("json" or a JSON schema) as OpenAI `response_format`."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": fmt, "strict": True},
        }
    raise InvalidRequestError("'format' must be \"json\" or a JSON schema object")


def ollama_image_parts(images: Any, where: str) -> list[dict[str, Any]]:
    """Ollama's `images` (base64 strings, no media type) as OpenAI `image_url` parts."""
    if not isinstance(images, list):
        raise InvalidRequestError(f"'{where}' must be an array of base64 strings")
    parts: list[dict[str, Any]] = []
    for index, image in enumerate(images):
        at = f"{where}[{index}]"
        if not isinstance(image, str):
            raise InvalidRequestError(f"{at} must be a base64 string")
        # A data: URL is not Ollama's, but it is unambiguous: take it too.
        url = checked_image_url(image, at) if image[:5] == "data:" else base64_image_url(image, at)
        parts.append(image_url_part(url))
    return parts


def user_content(text: str, image_parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A message's content: the text alone, or a text part followed by the images."""
    if not image_parts:
        return text
    return ([{"type": "text", "text": text}] if text else []) + image_parts


def ollama_messages_to_openai(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise InvalidRequestError("'messages' must be an array")
    converted: list[dict[str, Any]] = []
    # Ollama names a tool result by tool name; OpenAI wants the call's id.
    call_ids_by_name: dict[str, str] = {}
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{position}] must be an object")
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequestError(
                f"messages[{position}].role must be system, user, assistant or tool"
            )
        content = message.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{position}].content must be a string")
        out: dict[str, Any] = {"role": role, "content": content}
        images = message.get("images")
        if images is not None:
            parts = ollama_image_parts(images, f"messages[{position}].images")
            out["content"] = user_content(content, parts)
        tool_calls = message.get("tool_calls")
        if role == "assistant" and tool_calls:
            if not isinstance(tool_calls, list):
                raise InvalidRequestError(f"messages[{position}].tool_calls must be an array")
            out["tool_calls"] = []
            for call in tool_calls:
                function = (call or {}).get("function") or {}
                name = function.get("name", "")
                call_id = call.get("id") or f"call_{uuid.uuid4().hex[:24]}"
                call_ids_by_name[name] = call_id
                arguments = function.get("arguments", {})
                out["tool_calls"].append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": name,
                            "arguments": arguments
                            if isinstance(arguments, str)
                            else json.dumps(arguments),
                        },
                    }
                )
        if role == "tool":
            name = message.get("tool_name") or message.get("name") or ""
            out["tool_call_id"] = message.get("tool_call_id") or call_ids_by_name.get(
                name, f"call_{name or 'tool'}"
            )
            if name:
                out["name"] = name
        converted.append(out)
    return converted


def check_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise InvalidRequestError("'tools' must be an array of objects")
    return tools or None


def ollama_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Whole tool calls in Ollama's shape (arguments as an object)."""
    return [
        {
            "id": call.id,
            "function": {
                "index": index,
                "name": call.name,
                "arguments": parse_arguments(call.arguments),
            },
        }
        for index, call in enumerate(calls)
    ]


def ollama_done_reason(finish_reason: str | None) -> str:
    if finish_reason == "length":
        return "length"
    return "stop"


def final_stats(
    *,
    total_seconds: float,
    load_seconds: float,
    timings: Mapping[str, Any] | None,
    usage: Mapping[str, Any] | None,
) -> dict[str, int]:
    """Ollama's counts and nanosecond durations, from llama-server `timings` or usage."""
    timings = timings or {}
    usage = usage or {}
    # llama-server's prompt_n leaves out the tokens reused from its cache (cache_n);
    # Ollama's prompt_eval_count is the whole prompt, and a cached prompt shows only
    # as a short prompt_eval_duration (Ollama has no cached-token field).
    if "prompt_n" in timings:
        prompt_count = int(timings.get("prompt_n") or 0) + int(timings.get("cache_n") or 0)
    else:
        prompt_count = usage.get("prompt_tokens", 0) or 0
    eval_count = timings.get("predicted_n", usage.get("completion_tokens", 0)) or 0
    prompt_ns = int(float(timings.get("prompt_ms", 0) or 0) * 1e6)
    eval_ns = int(float(timings.get("predicted_ms", 0) or 0) * 1e6)
    total_ns = int(total_seconds * 1e9)
    load_ns = int(load_seconds * 1e9)
    if not eval_ns and eval_count:
        # No runner timings: attribute the time after loading to generation.
        eval_ns = max(total_ns - load_ns - prompt_ns, 0)
    return {
        "total_duration": max(total_ns, load_ns + prompt_ns + eval_ns),
        "load_duration": load_ns,
        "prompt_eval_count": int(prompt_count),
        "prompt_eval_duration": prompt_ns,
        "eval_count": int(eval_count),
        "eval_duration": eval_ns,
    }
