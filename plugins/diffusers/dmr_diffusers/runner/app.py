"""The runner's HTTP routes (Runner protocol, docs/architecture.md) on a Quart app."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dmr.sdk.runner import BadRequest, error_response, json_response
from quart import Quart, Response, request

from dmr_diffusers.runner.requests import parse_image_request

if TYPE_CHECKING:
    from dmr_diffusers.runner.pipeline import LoadedPipeline

__all__ = ["RunnerState", "create_app", "error_response"]

MAX_BODY_BYTES = 1 << 20  # a prompt and a few numbers


@dataclass
class RunnerState:
    """What the routes need; `pipeline` is None while loading."""

    model_name: str
    pipeline: LoadedPipeline | None = None
    created: int = 0
    load_error: str | None = None
    # One pipeline, one generation at a time: diffusers pipelines are not re-entrant.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    requests_total: int = 0
    images_total: int = 0
    failures_total: int = 0
    generation_seconds: float = 0.0


def _metrics_text(state: RunnerState) -> str:
    lines = []
    for name, kind, help_text, value in (
        ("diffusers:requests_total", "counter", "Image requests answered.", state.requests_total),
        ("diffusers:images_total", "counter", "Images generated.", state.images_total),
        ("diffusers:failures_total", "counter", "Generations that failed.", state.failures_total),
        (
            "diffusers:generation_seconds_total",
            "counter",
            "Seconds spent generating.",
            state.generation_seconds,
        ),
        (
            "diffusers:threads",
            "gauge",
            "torch threads the next generation computes with (fewer while other runners"
            " share the CPU, POST /cpu-share); 0 while loading.",
            0 if state.pipeline is None else state.pipeline.threads,
        ),
    ):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def create_app(state: RunnerState) -> Quart:
    app = Quart("dmr_diffusers_runner")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.get("/health")
    async def health() -> Response:
        if state.pipeline is None:
            return error_response(state.load_error or "loading the pipeline", 503)
        return json_response({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        item = {"id": state.model_name, "object": "model", "created": state.created}
        return json_response({"object": "list", "data": [{**item, "owned_by": "docker"}]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(_metrics_text(state), content_type="text/plain; version=0.0.4")

    @app.post("/v1/images/generations")
    async def generations() -> Response:
        raw = await request.get_data()
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            return error_response("the request body is not valid JSON")
        try:
            image_request = parse_image_request(body)
        except BadRequest as error:
            return error_response(error.message, param=error.param)
        pipeline = state.pipeline
        if pipeline is None:
            return error_response("the pipeline is still loading", 503)
        async with state.lock:
            started = time.monotonic()
            try:
                # Off the event loop: /health and /metrics answer during generation.
                images = await asyncio.to_thread(pipeline.generate, image_request)
            except BadRequest as error:
                state.failures_total += 1
                return error_response(error.message, param=error.param)
            except Exception as error:  # OOM, a broken pipeline: the client gets why
                state.failures_total += 1
                return error_response(f"image generation failed: {error}", 500)
            finally:
                state.generation_seconds += time.monotonic() - started
        state.requests_total += 1
        state.images_total += len(images)
        return json_response(
            {"created": int(time.time()), "data": [{"b64_json": b} for b in images]}
        )

    @app.post("/cpu-share")
    async def cpu_share() -> Response:
        """`{"busy_runners": n}`: n runners compute on the CPU now, this one included
        (the scheduler's CpuShare sends it; docs/scheduler.md)."""
        try:
            body = json.loads(await request.get_data() or b"null")
        except ValueError:
            return error_response("the request body is not valid JSON")
        busy = body.get("busy_runners") if isinstance(body, dict) else None
        if not isinstance(busy, int) or isinstance(busy, bool) or busy < 1:
            return error_response(
                "'busy_runners' must be an integer of at least 1", param="busy_runners"
            )
        if state.pipeline is None:
            return error_response("the pipeline is still loading", 503)
        return json_response({"threads": state.pipeline.share_threads(busy)})

    @app.errorhandler(413)
    async def too_large(_error: Exception) -> Response:
        return error_response(f"request body larger than {MAX_BODY_BYTES} bytes", 413)

    return app
