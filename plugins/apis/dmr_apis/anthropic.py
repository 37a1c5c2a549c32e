"""The Anthropic Messages dialect: `/anthropic/v1/messages`, `/v1/messages`, count_tokens."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from dmr.errors import InvalidRequestError
from dmr.hookspecs import hookimpl
from dmr.records import ApiDialect, Mode
from quart import Blueprint, Response, jsonify

from dmr_apis._anthropic_translate import (
    anthropic_content,
    anthropic_stop_reason,
    anthropic_to_openai,
    anthropic_usage,
    message_id,
    openai_messages,
    openai_tools,
)
from dmr_apis.common.answer_fold import AnswerFold, fold_answer
from dmr_apis.common.body import optional_bool, read_json_object, require_model
from dmr_apis.common.errors import anthropic_error_body, install_error_handlers
from dmr_apis.common.model_lookup import resolve_model
from dmr_apis.common.runner_calls import call_runner, stream_runner
from dmr_apis.common.streaming import encode_event, stream_response

__all__ = ["blueprint", "dmr_api_dialects"]

blueprint = Blueprint("dmr_apis_anthropic", __name__)
install_error_handlers(blueprint, anthropic_error_body)

_PREFIXES = ("/anthropic/v1", "/v1", "/engines/v1", "/engines/<backend>/v1")


def _stop(answer: AnswerFold, stop_sequences: Any) -> tuple[str, str | None]:
    """Anthropic's `stop_reason` and `stop_sequence` for the runner's answer."""
    stop_reason, stop_sequence = anthropic_stop_reason(
        answer.finish_reason, matched_stop=answer.matched_stop, stop_sequences=stop_sequences
    )
    if answer.tool_calls and stop_reason == "end_turn":
        stop_reason = "tool_use"  # some runners say "stop" after a tool call
    return stop_reason, stop_sequence


def _block_start(index: int, block: dict[str, Any]) -> bytes:
    return encode_event(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def _block_delta(index: int, delta: dict[str, Any]) -> bytes:
    return encode_event(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    )


def _block_stop(index: int) -> bytes:
    return encode_event("content_block_stop", {"type": "content_block_stop", "index": index})


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
        stop_reason, stop_sequence = _stop(answer, stop_sequences)
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

    async def events() -> AsyncIterator[bytes]:
        yield encode_event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": message_id(),
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                },
            },
        )
        yield encode_event("ping", {"type": "ping"})
        block_index = 0
        text_open = False
        thinking_open = False
        answer = AnswerFold()
        try:
            async for delta in answer.deltas(upstream.events()):
                if delta.reasoning and not text_open:
                    if not thinking_open:
                        thinking_open = True
                        thinking = {"type": "thinking", "thinking": "", "signature": ""}
                        yield _block_start(block_index, thinking)
                    yield _block_delta(
                        block_index, {"type": "thinking_delta", "thinking": delta.reasoning}
                    )
                if not delta.content:
                    continue
                if thinking_open:  # the thinking block comes before the text, whole
                    thinking_open = False
                    yield _block_stop(block_index)
                    block_index += 1
                if not text_open:
                    text_open = True
                    yield _block_start(block_index, {"type": "text", "text": ""})
                yield _block_delta(block_index, {"type": "text_delta", "text": delta.content})
        except Exception as error:  # the stream broke after the 200 went out
            yield encode_event(
                "error",
                {"type": "error", "error": {"type": "api_error", "message": str(error)}},
            )
            return
        if text_open or thinking_open:
            yield _block_stop(block_index)
            block_index += 1
        # Tool calls go out whole: fragments are merged before their block starts.
        for block in anthropic_content("", answer.calls) if answer.tool_calls else ():
            arguments = block.pop("input")
            block["input"] = {}
            yield _block_start(block_index, block)
            yield _block_delta(
                block_index, {"type": "input_json_delta", "partial_json": json.dumps(arguments)}
            )
            yield _block_stop(block_index)
            block_index += 1
        if block_index == 0:
            # Anthropic always answers with at least one (possibly empty) text block.
            yield _block_start(0, {"type": "text", "text": ""})
            yield _block_stop(0)
        stop_reason, stop_sequence = _stop(answer, stop_sequences)
        yield encode_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": anthropic_usage(answer.usage),
            },
        )
        yield encode_event("message_stop", {"type": "message_stop"})

    return stream_response(events(), "text/event-stream", on_close=upstream.aclose)


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
