"""The runner's routes around generation: health, models, metrics, and the tokenizer
and chat template on their own (tokenize, detokenize, apply-template)."""

from __future__ import annotations

from typing import Any

from dmr.sdk.runner import BadRequest, error_response, json_response
from quart import Blueprint, Response

from dmr_llamacpp.runner.batching import GeneratorStats
from dmr_llamacpp.runner.metrics import render_metrics
from dmr_llamacpp.runner.requests import parse_chat_prompt
from dmr_llamacpp.runner.state import request_body, runner_state

__all__ = ["blueprint"]

blueprint = Blueprint("dmr_llamacpp_service", __name__)


@blueprint.get("/health")
async def health() -> Response:
    state = runner_state()
    if state.load_error:
        return error_response(state.load_error, 500)
    if state.model is None:
        return error_response("loading model", 503)
    return json_response({"status": "ok"})


@blueprint.get("/v1/models")
@blueprint.get("/models")
async def models() -> Response:
    state = runner_state()
    meta: dict[str, Any] = {}
    if state.model is not None:
        meta = {
            "n_ctx_train": state.model.n_ctx_train,
            "n_embd": state.model.n_embd,
            "n_vocab": state.model.n_vocab,
        }
    return json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "llamacpp",
                    "meta": meta,
                }
            ],
        }
    )


@blueprint.get("/metrics")
async def metrics() -> Response:
    state = runner_state()
    generator = state.generator
    # Runners without a generator (loading, or pooling) report zeroed counters.
    stats = GeneratorStats if generator is None else lambda: generator.stats
    model = state.model
    threads, yielded = (0, 0) if model is None else (model.threads[0], model.yielded_steps)
    extra_buffers = model is not None and model.extra_buffers
    return Response(
        render_metrics(stats, threads, yielded, extra_buffers),
        content_type="text/plain; version=0.0.4",
    )


@blueprint.post("/cpu-share")
async def cpu_share() -> Response:
    """`{"busy_runners": n}`: n runners compute on this machine's cores now, this one
    included; compute with 1/n of the threads it loaded with (the scheduler's
    `CpuShare` sends it, docs/scheduler.md)."""
    body = await request_body()
    busy = body.get("busy_runners")
    if not isinstance(busy, int) or isinstance(busy, bool) or busy < 1:
        raise BadRequest("'busy_runners' must be an integer of at least 1", "busy_runners")
    state = runner_state()
    threads, threads_batch = state.require_model().share_threads(busy)
    generator = state.generator
    if generator is not None and generator.drafter is not None:
        generator.drafter.model.share_threads(busy)
    return json_response({"threads": threads, "threads_batch": threads_batch})


@blueprint.post("/tokenize")
async def tokenize() -> Response:
    body = await request_body()
    content = body.get("content")
    if not isinstance(content, str):
        raise BadRequest("'content' must be a string", "content")
    model = runner_state().require_model()
    tokens = model.tokenize(content, add_special=bool(body.get("add_special", False)))
    return json_response({"tokens": tokens})


@blueprint.post("/detokenize")
async def detokenize() -> Response:
    body = await request_body()
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise BadRequest("'tokens' must be a list of integers", "tokens")
    return json_response({"content": runner_state().require_model().detokenize(tokens)})


@blueprint.post("/apply-template")
async def apply_template() -> Response:
    prompt = parse_chat_prompt(await request_body())
    return json_response({"prompt": runner_state().render_prompt(prompt)})
