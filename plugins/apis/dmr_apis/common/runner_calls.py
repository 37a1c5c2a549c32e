"""Calling a runner for dialects that translate (Ollama, Anthropic, Responses).

The OpenAI dialect forwards bytes with `proxy_to_runner`; the others must read
the runner's OpenAI answer to rewrite it, so they come through here.

A streamed call runs in its own task that owns the scheduler lease from start
to end: Quart (on Python 3.11) sends a response body from a different task
than the view, and a lease entered in one task and left in another would break
any cancel scope inside the scheduler. The view waits for the runner's status
first, so a failed load or a busy scheduler is still a proper 4xx/5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from dmr.errors import DmrError, RunnerError
from dmr.records import Mode
from dmr.scheduler import RunnerHandle
from dmr.sdk import priority_headers
from dmr.server.metrics import note_model
from dmr.server.recorder import ExchangeCapture, start_capture
from dmr.server.services import get_services

from dmr_apis.common.streaming import iter_sse_json

__all__ = [
    "RunnerCall",
    "RunnerStream",
    "cached_prompt_tokens",
    "call_runner",
    "runner_error",
    "stream_runner",
]


@dataclass
class RunnerCall:
    """A non-streamed answer and how long the model took to load."""

    body: dict[str, Any]
    load_seconds: float


def runner_error(status: int, raw: bytes) -> DmrError:
    """The runner's error answer (OpenAI or llama-server shape) as a `DmrError`."""
    message = raw.decode(errors="replace").strip() or f"runner answered {status}"
    with contextlib.suppress(ValueError):
        body = json.loads(raw)
        if isinstance(body, dict):
            error = body.get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                message = error["message"]
            elif isinstance(error, str):
                message = error
            elif isinstance(body.get("message"), str):
                message = body["message"]
    error = RunnerError(message) if status >= 500 else DmrError(message)
    error.status = status
    if status < 500:
        error.error_type = "invalid_request_error"
        error.code = "invalid_request" if status == 400 else "runner_error"
    return error


async def call_runner(
    model: str,
    mode: Mode,
    path: str,
    payload: dict[str, Any],
    *,
    backend: str | None = None,
    keep_alive: float | None = None,
) -> RunnerCall:
    note_model(model)
    scheduler = get_services().scheduler
    started = time.monotonic()
    async with scheduler.acquire(model, mode, backend=backend, keep_alive=keep_alive) as handle:
        load_seconds = time.monotonic() - started
        try:
            response = await handle.client.post(path, json=payload, headers=priority_headers())
        except httpx.HTTPError as error:
            raise await _broken(handle, error) from None
    capture = _capture(model, handle, path, payload)
    if capture is not None:
        capture.finish(response.status_code, response.content)
    if response.status_code >= 500 and handle.stop_reason is not None:
        raise RunnerError(handle.stop_reason)  # unloaded under the request
    if response.status_code >= 400:
        raise runner_error(response.status_code, response.content)
    try:
        body = response.json()
    except ValueError:
        raise RunnerError(f"runner answered {path} with invalid JSON") from None
    if not isinstance(body, dict):
        raise RunnerError(f"runner answered {path} with {type(body).__name__}, not an object")
    return RunnerCall(body=body, load_seconds=load_seconds)


async def _broken(handle: RunnerHandle, error: httpx.HTTPError) -> RunnerError:
    """The runner's connection broke: why (it was unloaded, it crashed), if known."""
    reason = await handle.failure()
    return RunnerError(reason or f"runner connection broke: {error!r}")


_END = object()
# Stream events kept per request for the request recorder (a bound, not a limit
# any ordinary answer reaches).
_RECORDED_EVENTS = 100_000


def _capture(
    model: str, handle: RunnerHandle, path: str, payload: dict[str, Any]
) -> ExchangeCapture | None:
    return start_capture(
        model=model,
        model_id=handle.model_id,
        backend=handle.backend,
        mode=handle.mode.value,
        path=path,
        body=payload,
    )


@dataclass
class RunnerStream:
    """The decoded SSE events of one streamed runner call, in arrival order."""

    load_seconds: float
    _queue: asyncio.Queue[Any]
    _task: asyncio.Task[None]
    _closed: bool = field(default=False)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


async def stream_runner(
    model: str,
    mode: Mode,
    path: str,
    payload: dict[str, Any],
    *,
    backend: str | None = None,
    keep_alive: float | None = None,
) -> RunnerStream:
    """Start a streamed runner call; raises the runner's error before any byte is sent."""
    note_model(model)
    scheduler = get_services().scheduler
    # Unbounded on purpose: the pump never waits for the client, so it always
    # reaches the end of the generation and releases the runner, even for a
    # client that never reads (a stream is one answer, never large). Python
    # 3.11's wait_for can also swallow a cancel, which a bounded put would need.
    queue: asyncio.Queue[Any] = asyncio.Queue()
    ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def pump() -> None:
        started = time.monotonic()
        handle: RunnerHandle | None = None
        try:
            async with scheduler.acquire(
                model, mode, backend=backend, keep_alive=keep_alive
            ) as handle:
                load_seconds = time.monotonic() - started
                async with handle.client.stream(
                    "POST", path, json=payload, headers=priority_headers()
                ) as response:
                    if response.status_code >= 500 and handle.stop_reason is not None:
                        raise RunnerError(handle.stop_reason)  # unloaded under the request
                    if response.status_code >= 400:
                        raise runner_error(response.status_code, await response.aread())
                    ready.set_result(load_seconds)
                    capture = _capture(model, handle, path, payload)
                    # Kept for the recorder, which folds them once the stream ends.
                    seen: list[dict[str, Any]] = []
                    try:
                        async for event in iter_sse_json(response.aiter_lines()):
                            if capture is not None and len(seen) < _RECORDED_EVENTS:
                                seen.append(event)
                            queue.put_nowait(event)
                    finally:
                        if capture is not None:
                            capture.finish(response.status_code, events=seen)
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            if isinstance(error, httpx.HTTPError) and handle is not None:
                error = await _broken(handle, error)
            if not ready.done():
                ready.set_exception(error)
            else:
                queue.put_nowait(error)

    task = asyncio.create_task(pump())
    try:
        load_seconds = await asyncio.shield(ready)
    except BaseException:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise
    return RunnerStream(load_seconds=load_seconds, _queue=queue, _task=task)


def cached_prompt_tokens(usage: Mapping[str, Any]) -> int:
    """OpenAI's `prompt_tokens_details.cached_tokens`: prompt tokens reused from a cache."""
    details = usage.get("prompt_tokens_details")
    return int((details.get("cached_tokens") if isinstance(details, Mapping) else 0) or 0)
