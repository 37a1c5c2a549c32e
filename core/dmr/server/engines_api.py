"""Runner control routes: `/engines/ps`, `/engines/queue`, `/engines/unload`,
`/engines/_configure`.

Their shapes: docs/compatibility.md §4.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from quart import Blueprint, Response, jsonify, request

from dmr.durations import parse_duration
from dmr.errors import DmrError, InvalidRequestError
from dmr.records import Mode, RunnerConfig
from dmr.scheduler.configuration import split_raw_flags
from dmr.server.services import get_services

__all__ = ["blueprint", "parse_configure_body"]

log = logging.getLogger(__name__)

blueprint = Blueprint("dmr_engines_api", __name__)

# Preloads started by `_configure`, kept so they are not garbage-collected mid-way.
_preloads: set[asyncio.Task[None]] = set()


async def _json_object() -> dict[str, Any]:
    # Parsed here rather than with `get_json(silent=True)`, which lets bytes that
    # are not UTF-8 and very deep nesting through as exceptions (500s).
    raw = await request.get_data()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        raise InvalidRequestError("the request body is not valid JSON") from None
    except RecursionError:
        raise InvalidRequestError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


@blueprint.get("/engines/ps")
async def engines_ps() -> Response:
    return jsonify(get_services().scheduler.ps())


@blueprint.get("/engines/queue")
async def engines_queue() -> Response:
    """Requests waiting for memory, per model (dmr's own; `dmr ps` shows them)."""
    return jsonify(
        [
            {
                "model_name": queued.model,
                "model_id": queued.model_id,
                "backend_name": queued.backend,
                "mode": queued.mode.value,
                "waiting": queued.waiting,
                "oldest_wait_seconds": round(queued.oldest_wait, 3),
            }
            for queued in get_services().scheduler.queue()
        ]
    )


@blueprint.post("/engines/unload")
async def engines_unload() -> dict[str, int]:
    body = await _json_object()
    models = body.get("models")
    if models is None:
        models = []
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise InvalidRequestError("'models' must be a list of model names")
    # Typed as DMR's Go struct is: a wrong type is the client's mistake, not "false".
    unload_all = body.get("all")
    if unload_all is None:
        unload_all = False
    elif not isinstance(unload_all, bool):
        raise InvalidRequestError("'all' must be a boolean")
    backend = body.get("backend")
    if backend is not None and not isinstance(backend, str):
        raise InvalidRequestError("'backend' must be a string")
    unloaded = await get_services().scheduler.unload(
        all=unload_all, backend=backend or None, models=models
    )
    answer = {"unloaded_runners": unloaded.runners}
    if unloaded.cancelled_requests:  # dmr's addition: DMR's answer has the count only
        answer["cancelled_requests"] = unloaded.cancelled_requests
    return answer


def _keep_alive(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return parse_duration(value)
    except (ValueError, TypeError) as error:
        raise InvalidRequestError(f"keep_alive: {error}") from error


def _positive_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequestError(f"{key!r} must be a positive integer")
    return value


def parse_configure_body(body: Mapping[str, Any]) -> tuple[str, Mode, RunnerConfig]:
    """(model, mode, config) from a `_configure` body (docs/compatibility.md §4)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' is required")
    try:
        mode = Mode(body.get("mode") or Mode.COMPLETION)
    except ValueError as error:
        modes = ", ".join(m.value for m in Mode)
        raise InvalidRequestError(f"'mode' must be one of {modes}") from error
    flags = body.get("runtime-flags") or []
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise InvalidRequestError("'runtime-flags' must be a list of strings")
    raw = body.get("raw-runtime-flags") or ""
    if not isinstance(raw, str):
        raise InvalidRequestError("'raw-runtime-flags' must be a string")
    flags = [*flags, *split_raw_flags(raw)]
    speculative = body.get("speculative") or {}
    if not isinstance(speculative, dict):
        raise InvalidRequestError("'speculative' must be an object")
    engine_options: dict[str, Any] = {}
    for key in ("vllm", "llamacpp"):
        if body.get(key) is not None:
            if not isinstance(body[key], dict):
                raise InvalidRequestError(f"'{key}' must be an object")
            engine_options[key] = body[key]
    draft = speculative.get("draft_model") or None
    if draft is not None and not isinstance(draft, str):
        raise InvalidRequestError("'speculative.draft_model' must be a model name")
    num_tokens = speculative.get("num_tokens")
    if num_tokens is not None and (
        not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0
    ):
        raise InvalidRequestError("'speculative.num_tokens' must be a non-negative integer")
    acceptance = speculative.get("min_acceptance_rate")
    if acceptance is not None and (
        not isinstance(acceptance, int | float)
        or isinstance(acceptance, bool)
        or not 0 <= acceptance <= 1
    ):
        raise InvalidRequestError("'speculative.min_acceptance_rate' must be between 0 and 1")
    config = RunnerConfig(
        context_size=_positive_int(body, "context-size"),
        runtime_flags=tuple(flags),
        keep_alive=_keep_alive(body.get("keep_alive")),
        speculative_draft_model=str(draft) if draft else None,
        speculative_num_tokens=int(num_tokens) if num_tokens else None,
        speculative_min_acceptance_rate=float(acceptance) if acceptance else None,
        engine_options=engine_options,
        replicas=_positive_int(body, "replicas"),
    )
    return model, mode, config


async def _configure(backend: str | None) -> Response:
    model, mode, config = parse_configure_body(await _json_object())
    scheduler = get_services().scheduler
    await scheduler.configure(model, mode, backend, config)

    async def preload() -> None:
        try:
            await scheduler.preload(model, mode, backend=backend)
        except DmrError as error:
            log.error("preloading %s after _configure failed: %s", model, error.message)

    task = asyncio.create_task(preload())
    _preloads.add(task)
    task.add_done_callback(_preloads.discard)
    return Response("", status=202)


@blueprint.post("/engines/_configure")
async def configure_default() -> Response:
    return await _configure(None)


@blueprint.post("/engines/<backend>/_configure")
async def configure_backend(backend: str) -> Response:
    return await _configure(backend)


@blueprint.get("/engines/_configure")
async def configure_list() -> Response:
    return jsonify(get_services().scheduler.configs(request.args.get("model") or None))
