"""Forward one request to a runner and its bytes back, unchanged.

Server-sent event streams go through chunk by chunk without being parsed; other
answers are read whole first, so that a runner dying half-way still becomes a
proper 500 JSON error rather than a truncated body with a 200 status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quart import Response

from dmr.direct_streams import DIRECT_HEADER, read_summary
from dmr.errors import DmrError, RunnerError
from dmr.scheduler.unix_http import RunnerConnectionError, open_request
from dmr.scheduler.wait_queue import priority_headers
from dmr.server.affinity import prompt_prefix
from dmr.server.arrivals import lone_headers
from dmr.server.metrics import note_model
from dmr.server.recorder import start_capture
from dmr.server.services import Services, get_services

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from dmr.records import Mode
    from dmr.scheduler import RunnerHandle
    from dmr.scheduler.unix_http import UnixResponse
    from dmr.server.recorder import ExchangeCapture

__all__ = ["Exchange", "open_exchange", "proxy_to_runner", "sse_error_event"]

log = logging.getLogger(__name__)

# Headers of the runner's answer worth keeping; hop-by-hop ones are hypercorn's business.
_KEPT_HEADERS = ("content-type", "cache-control", "x-request-id")

# Clean-ups scheduled from finalizers, kept alive until they finish.
_pending: set[asyncio.Task[None]] = set()


def sse_error_event(error: DmrError) -> bytes:
    payload = {"error": {"message": error.message, "type": error.error_type, "code": error.code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _schedule(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, None]) -> None:
    task = loop.create_task(coroutine)
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def _runner_failure(handle: RunnerHandle, error: Exception) -> RunnerError:
    handle.mark_lost()  # a runner on a cluster node: the next requests go elsewhere
    reason = await handle.failure()
    if reason is not None:
        return RunnerError(reason)
    return RunnerError(f"{handle.backend} runner for {handle.model_name} failed: {error!r}")


@dataclass
class Exchange:
    """A runner's answer on its way to the client: whole (`content`) or streamed
    (`chunks`). The runner's lease is given back once the answer has been read,
    or by `aclose` when it never will be. `load_seconds`: how long the runner took
    to be ready (a load, a wait for memory), 0 for one already serving."""

    status: int
    headers: dict[str, str]
    content: bytes | None
    chunks: AsyncIterator[bytes] | None
    _cleanup: Callable[[], Coroutine[Any, Any, None]]
    _released: Callable[[], bool]
    load_seconds: float = 0.0
    # Where the runner takes the client's socket for a direct stream it offered
    # (dmr/direct_streams.py): (its drop box, this request's token).
    direct: tuple[str, str] | None = None

    @property
    def released(self) -> bool:
        return self._released()

    async def read(self) -> bytes:
        """The whole answer: `content`, or every chunk of the stream joined."""
        if self.chunks is None:
            return self.content or b""
        return b"".join([chunk async for chunk in self.chunks])

    async def aclose(self) -> None:
        if self.chunks is not None:
            with contextlib.suppress(BaseException):
                await self.chunks.aclose()  # type: ignore[attr-defined]
        await self._cleanup()


class _Lease:
    """A runner's lease from `Scheduler.acquire`, given back once however the exchange
    ends (it may end in another task than the one that took it)."""

    def __init__(self, lease: AbstractAsyncContextManager[RunnerHandle]) -> None:
        self._lease = lease
        self.released = False

    async def release(self) -> None:
        if not self.released:
            self.released = True
            await self._lease.__aexit__(None, None, None)


async def open_exchange(
    services: Services,
    *,
    model: str,
    mode: Mode | str,
    path: str,
    body: bytes,
    backend: str | None = None,
    keep_alive: float | None = None,
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
    extensions: Mapping[str, Any] | None = None,
    in_band_errors: bool = True,
    direct: bool = False,
) -> Exchange:
    """Acquire `model`'s runner, send `body` to `path` and start reading the answer.

    A `DmrError` (no such model, no capacity, a runner that failed) comes before
    any byte of the answer. Closing the upstream request, when the stream is
    closed or the client goes away, makes the runner stop the generation and
    free its slot. A stream that breaks half-way ends with an SSE error event
    (`in_band_errors`, for bytes a client reads) or raises the `RunnerError`
    (for a caller that reads the events itself). `direct`: ask a runner on this
    host for a direct stream (dmr/direct_streams.py); the caller then hands it the
    client's socket or declines, after the first chunk.
    """
    started = time.monotonic()
    lease = services.scheduler.acquire(
        model, mode, backend=backend, keep_alive=keep_alive, affinity=lambda: prompt_prefix(body)
    )
    handle = await lease.__aenter__()
    load_seconds = time.monotonic() - started
    held = _Lease(lease)
    token = None
    if direct and isinstance(handle.address, Path):  # not a runner on a cluster node
        token = secrets.token_hex(16)
        headers = {**(headers or {}), DIRECT_HEADER: token}
    upstream = await _send(handle, held, method, path, body, headers)

    async def cleanup() -> None:
        with contextlib.suppress(BaseException):
            await upstream.aclose()
        await held.release()

    kept = {name: upstream.headers[name] for name in _KEPT_HEADERS if name in upstream.headers}
    capture = start_capture(
        model=model,
        model_id=handle.model_id,
        backend=handle.backend,
        mode=handle.mode.value,
        path=path,
        body=body,
        extensions=extensions,
    )
    exchange = Exchange(
        upstream.status, kept, None, None, cleanup, lambda: held.released, load_seconds
    )
    if upstream.headers.get("content-type", "").startswith("text/event-stream"):
        exchange.chunks = _relay(upstream, handle, capture, held, in_band_errors)
        box = upstream.headers.get(DIRECT_HEADER)
        if token is not None and box:
            exchange.direct = (box, token)
    else:
        exchange.content = await _read_whole(upstream, handle, capture, cleanup)
    return exchange


async def _send(
    handle: RunnerHandle,
    held: _Lease,
    method: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str] | None,
) -> UnixResponse:
    """Send the request on the runner's socket and read the head of its answer; the
    lease is given back when that fails."""
    opening = open_request(
        handle.address,
        method,
        path,
        body,
        {
            "content-type": "application/json",
            **{k.lower(): v for k, v in (headers or {}).items()},
            **priority_headers(),  # batch work: the runner serves it behind chats
            **lone_headers(),  # no burst to wait for (dmr/server/arrivals.py)
        },
    )
    try:
        # A local runner's death closes its socket; a lost node's connections stay open.
        upstream = await (opening if handle.tcp_address is None else handle.unless_lost(opening))
    except RunnerConnectionError as error:
        await held.release()
        raise await _runner_failure(handle, error) from error
    except BaseException:
        await held.release()
        raise
    handle.track(upstream)  # dropped at once if the runner is lost
    return upstream


async def _read_whole(
    upstream: UnixResponse,
    handle: RunnerHandle,
    capture: ExchangeCapture | None,
    cleanup: Callable[[], Coroutine[Any, Any, None]],
) -> bytes:
    """A whole answer, read before anything is sent; the lease is given back after."""
    try:
        content = await upstream.read()
    except RunnerConnectionError as error:
        raise await _runner_failure(handle, error) from error
    finally:
        await cleanup()
    if upstream.status >= 500 and handle.stop_reason is not None:
        # The runner was stopped under the request: its shutdown's bare 500 says nothing.
        raise RunnerError(handle.stop_reason)
    if capture is not None:
        # Decoding the answer for the recorder must not delay sending it.
        asyncio.get_running_loop().call_soon(capture.finish, upstream.status, content)
    return content


async def _relay(
    upstream: UnixResponse,
    handle: RunnerHandle,
    capture: ExchangeCapture | None,
    held: _Lease,
    in_band_errors: bool,
) -> AsyncIterator[bytes]:
    """A streamed answer's chunks as they come; the lease is given back at its end."""
    try:
        async for chunk in upstream.iter_body():
            summary = read_summary(chunk)
            if summary is not None:  # the end of a direct stream: what the runner wrote
                if capture is not None:
                    capture.feed(summary.head)
                    capture.feed(summary.tail)
                continue
            if capture is not None:
                capture.feed(chunk)  # a bounded copy; parsed once the stream ends
            yield chunk
    except RunnerConnectionError as error:
        failure = await _runner_failure(handle, error)
        if not in_band_errors:
            raise failure from error
        log.error("stream from %s broke: %s", handle.model_name, failure.message)
        if capture is not None:
            capture.feed(sse_error_event(failure))
        yield sse_error_event(failure)
    finally:
        if capture is not None:
            capture.finish(upstream.status)
        # On a client disconnect this runs in a cancelled task: closing the
        # upstream connection is what tells the runner to stop generating.
        with contextlib.suppress(BaseException):
            await upstream.aclose()
        await held.release()


async def proxy_to_runner(
    *,
    model: str,
    mode: Mode | str,
    path: str,
    body: bytes,
    backend: str | None = None,
    keep_alive: float | None = None,
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
) -> Response:
    """`open_exchange` as a Quart response, for views; the lease is given back when
    the answer has been sent or the client has gone away."""
    note_model(model)
    exchange = await open_exchange(
        get_services(),
        model=model,
        mode=mode,
        path=path,
        body=body,
        backend=backend,
        keep_alive=keep_alive,
        method=method,
        headers=headers,
    )
    if exchange.chunks is None:
        return Response(exchange.content, status=exchange.status, headers=exchange.headers)
    chunks = exchange.chunks
    loop = asyncio.get_running_loop()
    # The finalizer must not hold the exchange: it holds the generator, which would
    # then never be collected.
    cleanup, released = exchange._cleanup, exchange._released

    def never_iterated() -> None:
        # A client gone before the first byte: Quart drops the generator unstarted,
        # so its `finally` never runs; the lease must still be given back.
        if not released() and not loop.is_closed():
            loop.call_soon_threadsafe(_schedule, loop, cleanup())

    weakref.finalize(chunks, never_iterated)
    response = Response(chunks, status=exchange.status, headers=exchange.headers)
    # Generations can outlast Quart's default response timeout.
    response.timeout = None
    return response
