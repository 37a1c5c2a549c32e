"""The Ollama dialect (`/api/...`), translated onto OpenAI-speaking runners.

Ollama clients stream NDJSON by default, expect whole tool calls (never
fragments) and read durations in nanoseconds from the final chunk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from dmr.sdk import ApiDialect, ConflictError, InvalidRequestError, Mode, dmr_version, hookimpl
from dmr.sdk.dialect import call_runner, get_services, stream_runner
from quart import Blueprint, Quart, Response, jsonify

from dmr_apis.common.answer_fold import fold_answer
from dmr_apis.common.body import optional_bool, read_json_object, require_model
from dmr_apis.common.errors import install_error_handlers, ollama_error_body
from dmr_apis.common.model_lookup import resolve_model
from dmr_apis.common.streaming import stream_response
from dmr_apis.ollama import model_routes
from dmr_apis.ollama.reply import GenerationReply
from dmr_apis.ollama.translate import (
    check_tools,
    iso_time,
    num_ctx,
    ollama_image_parts,
    ollama_messages_to_openai,
    options_to_openai,
    parse_keep_alive,
    response_format,
    user_content,
)

__all__ = ["blueprint", "dmr_api_dialects", "dmr_server_startup"]

log = logging.getLogger(__name__)

blueprint = Blueprint("dmr_apis_ollama", __name__, url_prefix="/api")
install_error_handlers(blueprint, ollama_error_body)
model_routes.register_routes(blueprint)

NDJSON = "application/x-ndjson"


@blueprint.get("/version")
async def version() -> Response:
    return jsonify({"version": dmr_version()})


async def _apply_num_ctx(name: str, model_id: str, options: dict[str, Any] | None) -> None:
    """`num_ctx` is a runner setting, not a sampling field: reconfigure when it changes."""
    wanted = num_ctx(options)
    if wanted is None:
        return
    scheduler = get_services().scheduler
    try:
        current = scheduler.config_for(model_id)
        if current.context_size == wanted:
            return
        # A request's option, not a setting to keep: the stored configuration
        # applies again after a restart.
        await scheduler.configure(
            name, Mode.COMPLETION, None, replace(current, context_size=wanted), persist=False
        )
    except ConflictError:
        # Busy with other requests: serve with the context it has rather than fail.
        log.info("num_ctx=%s ignored: the runner for %s is busy", wanted, name)


def _truncation(body: dict[str, Any]) -> dict[str, Any]:
    """Ollama truncates a prompt longer than the context rather than refuse it: the
    oldest messages, then the oldest tokens after `num_keep` (the runner does it, with
    its tokenizer and template; docs/apis.md). `"truncate": false` asks for the error."""
    truncate = optional_bool(body, "truncate")
    fields: dict[str, Any] = {"truncate": True if truncate is None else truncate}
    num_keep = (body.get("options") or {}).get("num_keep")
    if num_keep is not None:
        if isinstance(num_keep, bool) or not isinstance(num_keep, int) or num_keep < 0:
            raise InvalidRequestError("option 'num_keep' must be a non-negative integer")
        fields["n_keep"] = num_keep
    return fields


def _chat_payload(
    body: dict[str, Any], messages: list[dict[str, Any]], stream: bool
) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": body["model"], "messages": messages, "stream": stream}
    payload.update(options_to_openai(body.get("options")))
    fmt = response_format(body.get("format"))
    if fmt is not None:
        payload["response_format"] = fmt
    tools = check_tools(body.get("tools"))
    if tools:
        payload["tools"] = tools
    think = body.get("think")
    if isinstance(think, bool):
        payload["chat_template_kwargs"] = {"enable_thinking": think}
    elif isinstance(think, str):
        payload["reasoning_effort"] = think
    elif think is not None:
        raise InvalidRequestError("'think' must be a boolean or low/medium/high")
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


def _with_model_defaults(
    model: Any, messages: list[dict[str, Any]] | None, body: dict[str, Any]
) -> None:
    """System prompt and parameters saved by `/api/create` apply unless the request sets them."""
    defaults = model_routes.ollama_defaults(model)
    system = defaults.get("system")
    if messages is not None and system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    parameters = defaults.get("parameters") or {}
    if parameters:
        body["options"] = {**parameters, **(body.get("options") or {})}


async def _generation(
    *, route: str, body: dict[str, Any], messages: list[dict[str, Any]] | None, prompt: str | None
) -> Response:
    """Shared by chat and generate: `route` picks the reply shape ("message" or "response")."""
    started = time.monotonic()
    name, model = resolve_model(require_model(body))
    stream = optional_bool(body, "stream")
    stream = True if stream is None else stream
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequestError("'options' must be an object")
    _with_model_defaults(model, messages, body)
    if messages is not None:
        payload = _chat_payload(body, messages, stream)
        path = "/v1/chat/completions"
    else:
        payload = {"model": body["model"], "prompt": prompt or "", "stream": stream}
        payload.update(options_to_openai(body.get("options")))
        if stream:
            payload["stream_options"] = {"include_usage": True}
        path = "/v1/completions"
    payload.update(_truncation(body))
    await _apply_num_ctx(name, model.id, body.get("options"))
    reply = GenerationReply(model=body["model"], route=route, started=started)
    if not stream:
        result = await call_runner(name, Mode.COMPLETION, path, payload, keep_alive=keep_alive)
        return jsonify(reply.whole(fold_answer(result.body), result.load_seconds))

    upstream = await stream_runner(name, Mode.COMPLETION, path, payload, keep_alive=keep_alive)
    lines = reply.lines(upstream.events(), upstream.load_seconds)
    return stream_response(lines, NDJSON, on_close=upstream.aclose)


@blueprint.post("/chat")
async def chat() -> Response:
    _, body = await read_json_object()
    require_model(body)
    messages = ollama_messages_to_openai(body.get("messages") or [])
    if not messages:
        return await _load_or_unload(body, route="chat")
    return await _generation(route="chat", body=body, messages=messages, prompt=None)


@blueprint.post("/generate")
async def generate() -> Response:
    _, body = await read_json_object()
    require_model(body)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidRequestError("'prompt' must be a string")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise InvalidRequestError("'system' must be a string")
    images = body.get("images")
    image_parts = ollama_image_parts(images, "images") if images is not None else []
    if not prompt and not image_parts:
        return await _load_or_unload(body, route="generate")
    if body.get("raw"):
        if image_parts:
            # A raw prompt goes to /v1/completions, which has no place for an image.
            raise InvalidRequestError("'images' cannot be sent with 'raw': true")
        return await _generation(route="generate", body=body, messages=None, prompt=prompt)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_content(prompt or "", image_parts)})
    return await _generation(route="generate", body=body, messages=messages, prompt=None)


async def _load_or_unload(body: dict[str, Any], *, route: str) -> Response:
    """An empty prompt loads the model; with `keep_alive: 0` it unloads it (Ollama's idiom)."""
    name, _ = resolve_model(require_model(body))
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    scheduler = get_services().scheduler
    if keep_alive == 0:
        # Ollama's `keep_alive: 0` lets requests in flight finish first.
        await scheduler.unload(models=[name], cancel_busy=False)
        reason = "unload"
    else:
        await scheduler.preload(name, Mode.COMPLETION, keep_alive=keep_alive)
        reason = "load"
    line: dict[str, Any] = {"model": body["model"], "created_at": iso_time()}
    if route == "chat":
        line["message"] = {"role": "assistant", "content": ""}
    else:
        line["response"] = ""
    line.update({"done": True, "done_reason": reason})
    return jsonify(line)


@blueprint.post("/embed")
async def embed() -> Response:
    started = time.monotonic()
    _, body = await read_json_object()
    name, _ = resolve_model(require_model(body))
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
        raise InvalidRequestError("'input' must be a string or an array of strings")
    payload: dict[str, Any] = {"model": body["model"], "input": inputs}
    dimensions = body.get("dimensions")
    if dimensions is not None:
        payload["dimensions"] = dimensions
    result = await call_runner(
        name,
        Mode.EMBEDDING,
        "/v1/embeddings",
        payload,
        keep_alive=parse_keep_alive(body.get("keep_alive")),
    )
    data = sorted(result.body.get("data") or [], key=lambda item: item.get("index", 0))
    usage = result.body.get("usage") or {}
    return jsonify(
        {
            "model": body["model"],
            "embeddings": [item.get("embedding") for item in data],
            "total_duration": int((time.monotonic() - started) * 1e9),
            "load_duration": int(result.load_seconds * 1e9),
            "prompt_eval_count": usage.get("prompt_tokens", 0),
        }
    )


@blueprint.post("/embeddings")
async def embeddings() -> Response:
    """The legacy single-prompt embedding route."""
    _, body = await read_json_object()
    name, _ = resolve_model(require_model(body))
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequestError("'prompt' must be a string")
    result = await call_runner(
        name,
        Mode.EMBEDDING,
        "/v1/embeddings",
        {"model": body["model"], "input": prompt},
        keep_alive=parse_keep_alive(body.get("keep_alive")),
    )
    data = result.body.get("data") or [{}]
    return jsonify({"embedding": data[0].get("embedding") or []})


@hookimpl
def dmr_api_dialects() -> list[ApiDialect]:
    return [ApiDialect(name="ollama", blueprint=blueprint)]


@hookimpl
def dmr_server_startup(app: Quart) -> None:
    model_routes.allow_large_blob_uploads(app)
