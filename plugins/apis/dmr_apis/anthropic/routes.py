"""The Anthropic Messages dialect: `/anthropic/v1/messages`, `/v1/messages`, count_tokens."""

from __future__ import annotations

from typing import Any

from dmr.sdk import ApiDialect, InvalidRequestError, Mode, hookimpl
from dmr.sdk.dialect import call_runner, stream_runner
from quart import Blueprint, Response, jsonify

from dmr_apis.anthropic.stream import MessageStream, stop_of
from dmr_apis.anthropic.translate import (
    anthropic_content,
    anthropic_to_openai,
    anthropic_usage,
    message_id,
    openai_messages,
    openai_tools,
)
from dmr_apis.common.answer_fold import fold_answer
from dmr_apis.common.body import optional_bool, read_json_object, require_model
from dmr_apis.common.errors import anthropic_error_body, install_error_handlers
from dmr_apis.common.model_lookup import resolve_model
from dmr_apis.common.streaming import stream_response

__all__ = ["blueprint", "dmr_api_dialects"]

blueprint = Blueprint("dmr_apis_anthropic", __name__)
install_error_handlers(blueprint, anthropic_error_body)

_PREFIXES = ("/anthropic/v1", "/v1", "/engines/v1", "/engines/<backend>/v1")


async def messages(backend: str | None = None) -> Response:
    _, body = await read_json_object()
    name, _ = resolve_model(require_model(body))
    stream = bool(optional_bool(body, "stream"))
    payload = anthropic_to_openai(body, stream=stream)
    stop_sequences = body.get("stop_sequences")
    if not stream:
        result = await call_runner(
            name, Mode.COMPLETION, "/v1/chat/completions", payload, backend=backend
        )
        answer = fold_answer(result.body)
        stop_reason, stop_sequence = stop_of(answer, stop_sequences)
        return jsonify(
            {
                "id": message_id(),
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": anthropic_content(answer.content, answer.calls, answer.reasoning),
                "stop_reason": stop_reason,
                "stop_sequence": stop_sequence,
                "usage": anthropic_usage(answer.usage),
            }
        )

    upstream = await stream_runner(
        name, Mode.COMPLETION, "/v1/chat/completions", payload, backend=backend
    )
    events = MessageStream(body["model"], stop_sequences).events(upstream.events())
    return stream_response(events, "text/event-stream", on_close=upstream.aclose)


async def count_tokens(backend: str | None = None) -> Response:
    _, body = await read_json_object()
    name, _ = resolve_model(require_model(body))
    template_request: dict[str, Any] = {
        "messages": openai_messages(body.get("system"), body.get("messages"))
    }
    tools = openai_tools(body.get("tools"))
    if tools:
        template_request["tools"] = tools
    rendered = await call_runner(
        name, Mode.COMPLETION, "/apply-template", template_request, backend=backend
    )
    prompt = rendered.body.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequestError("the runner could not render this conversation")
    tokenized = await call_runner(
        name,
        Mode.COMPLETION,
        "/tokenize",
        {"content": prompt, "add_special": False},
        backend=backend,
    )
    tokens = tokenized.body.get("tokens") or []
    return jsonify({"input_tokens": len(tokens)})


for _prefix in _PREFIXES:
    _key = _prefix.strip("/").replace("/", "_").replace("<", "").replace(">", "")
    blueprint.add_url_rule(f"{_prefix}/messages", f"messages_{_key}", messages, methods=["POST"])
    blueprint.add_url_rule(
        f"{_prefix}/messages/count_tokens",
        f"count_tokens_{_key}",
        count_tokens,
        methods=["POST"],
    )


@hookimpl
def dmr_api_dialects() -> list[ApiDialect]:
    return [ApiDialect(name="anthropic", blueprint=blueprint)]
