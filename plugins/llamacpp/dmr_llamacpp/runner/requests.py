"""Reading OpenAI request bodies, once, into the records the rest of the runner reads.

A generation route parses its body here (`parse_chat_request`,
`parse_completion_request`, `parse_chat_prompt` for `/apply-template`) into a frozen
record: the messages as the template takes them, the tools and their grammar, the
sampling parameters (grammar, stops and logprobs among them), the image URLs and the
stream options. Bad fields become 400s, in the order the fields are read below.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from dmr.sdk.runner import BadRequest

from dmr_llamacpp.runner.chat import add_instruction, plan_tools, schema_grammar
from dmr_llamacpp.runner.logit_bias import parse_logit_bias
from dmr_llamacpp.runner.sampling import SamplingParams
from dmr_llamacpp.runner.truncation import Truncation, wants_truncation
from dmr_llamacpp.settings import WorkerSettings

__all__ = [
    "DEFAULT_MEDIA_MARKER",
    "ChatPrompt",
    "ChatRequest",
    "CompletionRequest",
    "parse_chat_prompt",
    "parse_chat_request",
    "parse_completion_request",
    "sampling_from_body",
]

# libmtmd's default media marker; the runner renders its projector's own (random) one.
DEFAULT_MEDIA_MARKER = "<__media__>"


@dataclass(frozen=True)
class ChatPrompt:
    """What the chat template renders for a chat body."""

    # The messages as the template takes them: content parts joined into text (an
    # image as the media marker), earlier tool calls as text, and with tools the
    # instruction to call them added to the system message.
    messages: tuple[dict[str, Any], ...]
    tools: list[Any] | None  # the request's `tools`, which the template may show
    # The template's variables: the request's `chat_template_kwargs` (for a chat
    # request, with `enable_thinking` set by its thinking budget).
    variables: dict[str, Any] | None
    with_tools: bool  # tools are in play: the answer is a tool call or a response
    tool_grammar: str | None  # what a tools answer must follow
    image_urls: tuple[str, ...]  # the images' URLs, in prompt order


@dataclass(frozen=True)
class ChatRequest:
    """A `/v1/chat/completions` body."""

    prompt: ChatPrompt
    sampling: SamplingParams
    thinking_budget: int  # tokens of thinking allowed; -1: unlimited
    truncation: Truncation | None  # None: a prompt too long is refused
    # Thinking goes to `reasoning_content` (llama-server's `reasoning_format: "none"`
    # leaves it in the content).
    split_reasoning: bool
    stream: bool
    include_usage: bool  # `stream_options.include_usage`


@dataclass(frozen=True)
class CompletionRequest:
    """A `/v1/completions` body."""

    prompt: str
    sampling: SamplingParams
    truncation: Truncation | None
    stream: bool
    include_usage: bool


def parse_chat_request(
    body: dict[str, Any],
    defaults: WorkerSettings,
    *,
    media_marker: str = DEFAULT_MEDIA_MARKER,
    accepts_images: Callable[[], object] | None = None,
) -> ChatRequest:
    """`body` read once; `accepts_images` is called (and may raise its 400) when the
    messages carry images, before the sampling fields are read."""
    prompt = parse_chat_prompt(body, media_marker=media_marker)
    if prompt.image_urls and accepts_images is not None:
        accepts_images()
    sampling = sampling_from_body(body, defaults, chat=True, grammar=prompt.tool_grammar)
    budget, variables = _reasoning_budget(body, prompt.variables, defaults.reasoning_budget)
    stream, include_usage = _stream_options(body)
    return ChatRequest(
        prompt=replace(prompt, variables=variables),
        sampling=sampling,
        thinking_budget=budget,
        truncation=wants_truncation(body),
        split_reasoning=body.get("reasoning_format") != "none",
        stream=stream,
        include_usage=include_usage,
    )


def parse_completion_request(body: dict[str, Any], defaults: WorkerSettings) -> CompletionRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string", "prompt")
    sampling = sampling_from_body(body, defaults, chat=False)
    stream, include_usage = _stream_options(body)
    return CompletionRequest(
        prompt=prompt,
        sampling=sampling,
        truncation=wants_truncation(body),
        stream=stream,
        include_usage=include_usage,
    )


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """(`stream`, `stream_options.include_usage`); the latter only counts when streaming."""
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
    return stream, include_usage


def _reasoning_budget(
    body: dict[str, Any], variables: dict[str, Any] | None, default: int
) -> tuple[int, dict[str, Any] | None]:
    """The request's thinking budget (-1: unlimited) and its chat template variables.

    A request's `reasoning_budget` (dmr's, what the Ollama and Anthropic dialects send)
    or `chat_template_kwargs.enable_thinking: false` (llama-server's) overrides the
    runner's `--reasoning-budget`; a budget of 0 renders the template with
    `enable_thinking` false, the switch Qwen3-style templates know.
    """
    kwargs = dict(variables) if variables is not None else {}
    budget = default
    raw = body.get("reasoning_budget")
    if raw is not None:
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < -1:
            message = "'reasoning_budget' must be -1, 0 or a token count"
            raise BadRequest(message, "reasoning_budget")
        budget = raw
    if kwargs.get("enable_thinking") is False:
        budget = 0
    if budget == 0:
        kwargs.setdefault("enable_thinking", False)
    return budget, kwargs or None


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


def _repeat_last_n(body: dict[str, Any], default: int) -> int:
    value = _integer(body, "repeat_last_n")
    if value is None:
        return default
    if value < -1:
        message = "'repeat_last_n' must be -1 (the context), 0 (off) or more"
        raise BadRequest(message, "repeat_last_n")
    return value


def _mirostat(body: dict[str, Any], default: int) -> int:
    value = _integer(body, "mirostat")
    if value is None:
        return default
    if value not in (0, 1, 2):
        raise BadRequest("'mirostat' must be 0 (off), 1 or 2", "mirostat")
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
        repeat_last_n=_repeat_last_n(body, defaults.repeat_last_n),
        presence_penalty=_number(body, "presence_penalty", defaults.presence_penalty),
        frequency_penalty=_number(body, "frequency_penalty", defaults.frequency_penalty),
        seed=seed if seed is not None else (defaults.seed if defaults.seed >= 0 else None),
        typical_p=_number(body, "typical_p", defaults.typical_p, low=0),
        mirostat=_mirostat(body, defaults.mirostat),
        mirostat_tau=_number(body, "mirostat_tau", defaults.mirostat_tau, low=0),
        mirostat_eta=_number(body, "mirostat_eta", defaults.mirostat_eta, low=0),
        grammar=grammar if grammar is not None else response_format_grammar(body),
        max_tokens=max_tokens,
        stop=_stops(body),
        logprobs=logprobs,
        ignore_eos=bool(body.get("ignore_eos", False)),
        cache_prompt=_flag(body, "cache_prompt", default=True),
        logit_bias=parse_logit_bias(body),
    )


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


def parse_chat_prompt(
    body: dict[str, Any], *, media_marker: str = DEFAULT_MEDIA_MARKER
) -> ChatPrompt:
    """The messages, tools and template variables of a chat body.

    Image parts become `media_marker` in the text; their URLs go to `image_urls`, in
    prompt order.
    """
    urls: list[str] = []
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    rendered = [_template_message(message, media_marker, urls) for message in messages]
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("'tools' must be a list", "tools")
    try:
        plan = plan_tools(tools or [], body.get("tool_choice"))
    except (KeyError, TypeError, ValueError) as error:
        raise BadRequest(f"invalid tools: {error}", "tools") from None
    variables = body.get("chat_template_kwargs")
    if plan is not None:
        rendered = add_instruction(rendered, plan.instruction)
    return ChatPrompt(
        messages=tuple(rendered),
        tools=tools,
        variables=variables if isinstance(variables, dict) else None,
        with_tools=plan is not None,
        tool_grammar=plan.grammar if plan is not None else None,
        image_urls=tuple(urls),
    )


def _template_message(message: Any, media_marker: str, urls: list[str]) -> dict[str, Any]:
    """One message as the template takes it (see `ChatPrompt.messages`)."""
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
    return item
