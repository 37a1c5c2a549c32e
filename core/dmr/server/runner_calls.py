"""Calling a runner from a view and reading its OpenAI answer: whole, as a JSON object
(`call_runner`), or streamed, as its decoded SSE events (`stream_runner`).

Dialects that translate (Ollama, Anthropic, Responses) read the runner's answer to
rewrite it; those that forward bytes use `proxy_to_runner`. All go through
`open_exchange` (dmr.server.proxy): the same lease, headers, recording, metrics
label and errors for every call to a runner.

A streamed call runs in its own task that owns the scheduler lease from start to
end: Quart (on Python 3.11) sends a response body from a different task than the
view, and the task also reads the whole generation whether or not the client
does. The view waits for the runner's status first, so a failed load or a busy
scheduler is still a proper 4xx/5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dmr.errors import DmrError, RunnerError
from dmr.server.metrics import note_model
from dmr.server.proxy import open_exchange
from dmr.server.services import get_services

if TYPE_CHECKING:
    from dmr.records import Mode
    from dmr.server.proxy import Exchange
    from dmr.server.services import Services

__all__ = [
    "RunnerCall",
    "RunnerStream",
    "call_runner",
    "iter_sse_json",
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


def _encode(payload: dict[str, Any]) -> bytes:
    # As httpx encodes `json=`: compact, UTF-8, and no NaN (which is no JSON).
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


async def _open(
    services: Services,
    model: str,
    mode: Mode | str,
    path: str,
    payload: dict[str, Any],
    backend: str | None,
    keep_alive: float | None,
) -> Exchange:
    return await open_exchange(
        services,
        model=model,
        mode=mode,
        path=path,
        body=_encode(payload),
        backend=backend,
        keep_alive=keep_alive,
        in_band_errors=False,
    )


async def call_runner(
    model: str,
    mode: Mode | str,
    path: str,
    payload: dict[str, Any],
    *,
    backend: str | None = None,
    keep_alive: float | None = None,
) -> RunnerCall:
    """POST `payload` to the runner's `path` and answer its JSON object; the runner's
    error answers are raised as `DmrError`s with their status."""
    note_model(model)
    exchange = await _open(get_services(), model, mode, path, payload, backend, keep_alive)
    try:
        raw = await exchange.read()
    finally:
        await exchange.aclose()
    if exchange.status >= 400:
        raise runner_error(exchange.status, raw)
    try:
        body = json.loads(raw)
    except ValueError:
        raise RunnerError(f"runner answered {path} with invalid JSON") from None
    if not isinstance(body, dict):
        raise RunnerError(f"runner answered {path} with {type(body).__name__}, not an object")
    return RunnerCall(body=body, load_seconds=exchange.load_seconds)


async def iter_sse_json(lines: AsyncIterable[str]) -> AsyncGenerator[dict[str, Any], None]:
    """Each `data:` payload of an OpenAI-style SSE stream, decoded, until `[DONE]`."""
    async for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments, `event:` names
        # OpenAI-style streams carry each event on a single data line.
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        if payload:
            event = json.loads(payload)
            if isinstance(event, dict):
                yield event


async def _lines(exchange: Exchange) -> AsyncIterator[str]:
    """The answer's text lines as they arrive."""
    pending = b""
    async for chunk in exchange.chunks or _whole(exchange.content or b""):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode(errors="replace")
    if pending:
        yield pending.rstrip(b"\r").decode(errors="replace")


async def _whole(content: bytes) -> AsyncIterator[bytes]:
    yield content


_END = object()


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
    mode: Mode | str,
    path: str,
    payload: dict[str, Any],
    *,
    backend: str | None = None,
    keep_alive: float | None = None,
) -> RunnerStream:
    """Start a streamed runner call; raises the runner's error before any byte is sent."""
    note_model(model)
    # Unbounded on purpose: the pump never waits for the client, so it always
    # reaches the end of the generation and releases the runner, even for a
    # client that never reads (a stream is one answer, never large). Python
    # 3.11's wait_for can also swallow a cancel, which a bounded put would need.
    queue: asyncio.Queue[Any] = asyncio.Queue()
    ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    services = get_services()

    def opening() -> Awaitable[Exchange]:
        return _open(services, model, mode, path, payload, backend, keep_alive)

    task = asyncio.create_task(_pump(opening, queue, ready))
    try:
        load_seconds = await asyncio.shield(ready)
    except BaseException:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise
    return RunnerStream(load_seconds=load_seconds, _queue=queue, _task=task)


async def _pump(
    opening: Callable[[], Awaitable[Exchange]],
    queue: asyncio.Queue[Any],
    ready: asyncio.Future[float],
) -> None:
    """Open the exchange, then put each event on `queue` (an error: on `ready` before
    the first, on `queue` after)."""
    exchange: Exchange | None = None
    try:
        exchange = await opening()
        if exchange.status >= 400:
            raise runner_error(exchange.status, await exchange.read())
        ready.set_result(exchange.load_seconds)
        async with contextlib.aclosing(iter_sse_json(_lines(exchange))) as events:
            async for event in events:
                queue.put_nowait(event)
        queue.put_nowait(_END)
    except asyncio.CancelledError:
        raise
    except BaseException as error:
        if not ready.done():
            ready.set_exception(error)
        else:
            queue.put_nowait(error)
    finally:
        if exchange is not None:
            await exchange.aclose()
