"""Reading OpenAI request bodies into sampling parameters; bad fields become 400s."""

from __future__ import annotations

import json
from typing import Any

from dmr.runner_support import BadRequest

from dmr_llamacpp.runner.chat import add_instruction, plan_tools, schema_grammar
from dmr_llamacpp.runner.sampling import SamplingParams
from dmr_llamacpp.settings import WorkerSettings

__all__ = ["DEFAULT_MEDIA_MARKER", "normalise_messages", "sampling_from_body"]


def _number(body: dict[str, Any], name: str, default: float, *, low: float | None = None) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{name}' must be a number", name)
    if low is not None and value < low:
        raise BadRequest(f"'{name}' must be at least {low}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer", name)
    return value


def _flag(body: dict[str, Any], name: str, *, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false", name)
    return value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        return tuple(stop)
    raise BadRequest("'stop' must be a string or a list of strings", "stop")


def response_format_grammar(body: dict[str, Any]) -> str | None:
    if isinstance(body.get("grammar"), str):
        return str(body["grammar"])
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise BadRequest("'response_format' must be an object", "response_format")
    kind = fmt.get("type")
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return schema_grammar(fmt.get("schema"))
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise BadRequest(
                    "'response_format.json_schema.schema' is required", "response_format"
                )
            return schema_grammar(spec["schema"])
    except ValueError as error:
        if isinstance(error, BadRequest):
            raise
        raise BadRequest(str(error), "response_format") from None
    raise BadRequest(f"unknown response_format type {kind!r}", "response_format")


def sampling_from_body(
    body: dict[str, Any], defaults: WorkerSettings, *, chat: bool, grammar: str | None = None
) -> SamplingParams:
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise BadRequest("only n=1 is supported", "n")
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is None and defaults.n_predict > 0:
        max_tokens = defaults.n_predict
    if max_tokens is not None and max_tokens < 0:
        max_tokens = None  # llama.cpp: -1 means until the context is full
    logprobs: int | None = None
    if chat:
        if body.get("logprobs"):
            logprobs = _integer(body, "top_logprobs") or 0
            if not 0 <= logprobs <= 20:
                raise BadRequest("'top_logprobs' must be between 0 and 20", "top_logprobs")
    else:
        raw = body.get("logprobs")
        if raw is not None and raw is not False:
            logprobs = _integer(body, "logprobs") or 0
            if not 0 <= logprobs <= 20:
                raise BadRequest("'logprobs' must be between 0 and 20", "logprobs")
    seed = _integer(body, "seed")
    top_k = _integer(body, "top_k")
    return SamplingParams(
        temperature=_number(body, "temperature", defaults.temperature, low=0),
        top_k=defaults.top_k if top_k is None else top_k,
        top_p=_number(body, "top_p", defaults.top_p, low=0),
        min_p=_number(body, "min_p", defaults.min_p, low=0),
        repeat_penalty=_number(body, "repeat_penalty", defaults.repeat_penalty, low=0),
        repeat_last_n=defaults.repeat_last_n,
        presence_penalty=_number(body, "presence_penalty", defaults.presence_penalty),
        frequency_penalty=_number(body, "frequency_penalty", defaults.frequency_penalty),
        seed=seed if seed is not None else (defaults.seed if defaults.seed >= 0 else None),
        grammar=grammar if grammar is not None else response_format_grammar(body),
        max_tokens=max_tokens,
        stop=_stops(body),
        logprobs=logprobs,
        ignore_eos=bool(body.get("ignore_eos", False)),
        cache_prompt=_flag(body, "cache_prompt", default=True),
    )


# libmtmd's default media marker; the runner renders its projector's own (random) one.
DEFAULT_MEDIA_MARKER = "<__media__>"


def _image_url(part: dict[str, Any]) -> str:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise BadRequest("an 'image_url' part needs 'image_url.url'", "messages")
    return url


def _content_text(content: Any, media_marker: str, image_urls: list[str]) -> str:
    """A message's text; each image part becomes `media_marker`, its URL goes to
    `image_urls`.

    Parts are joined as llama-server joins them for a template that takes string
    content (common/chat.cpp, `to_json_oaicompat`): text parts with a newline between
    them, none next to a marker.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or a list of parts", "messages")
    kinds = [part.get("type") if isinstance(part, dict) else None for part in content]
    for kind in kinds:
        if kind not in ("text", "image_url"):
            raise BadRequest(
                f"unsupported content part type {kind!r}: 'text' and 'image_url' are supported",
                "messages",
            )
    if "image_url" not in kinds:
        return "\n".join(str(part.get("text", "")) for part in content)
    text = ""
    after_marker = False
    for part in content:
        if part["type"] == "image_url":
            image_urls.append(_image_url(part))
            text += media_marker
            after_marker = True
            continue
        if text and not after_marker:
            text += "\n"
        text += str(part.get("text", ""))
        after_marker = False
    return text


def normalise_messages(
    body: dict[str, Any],
    *,
    media_marker: str = DEFAULT_MEDIA_MARKER,
    image_urls: list[str] | None = None,
) -> tuple[list[dict[str, Any]], str | None, bool]:
    """(messages for the template, tool grammar, whether tools are in play).

    Image parts become `media_marker` in the text; their URLs, in prompt order, are
    appended to `image_urls` (when given).
    """
    urls: list[str] = [] if image_urls is None else image_urls
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    rendered: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("each message needs a 'role'", "messages")
        item = dict(message)
        item["content"] = _content_text(message.get("content"), media_marker, urls)
        if message.get("tool_calls") and not item["content"]:
            # Earlier calls, shown to the model in the same format it must answer in.
            call = message["tool_calls"][0].get("function", {})
            try:
                arguments = json.loads(call.get("arguments") or "{}")
            except json.JSONDecodeError:
                arguments = call.get("arguments")
            item["content"] = json.dumps(
                {"tool_call": {"name": call.get("name"), "arguments": arguments}}
            )
        rendered.append(item)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("'tools' must be a list", "tools")
    try:
        plan = plan_tools(tools or [], body.get("tool_choice"))
    except (KeyError, TypeError, ValueError) as error:
        raise BadRequest(f"invalid tools: {error}", "tools") from None
    if plan is None:
        return rendered, None, False
    return add_instruction(rendered, plan.instruction), plan.grammar, True
