"""Dialects' forwarding routes, answered straight from the ASGI server.

A chat request streamed through `dmr serve` went through Quart's request
context, before/after hooks, view dispatch with its timeout scope, and for every
SSE event the response wrapper's send loop. Profiled with py-spy (one stream,
one-token answers, 2 CPUs that llama.cpp keeps busy) that was about a third of
the server's CPU per request, and every millisecond of it is taken from the
runner's decode threads and delays the next request of a burst reaching the
runner. `ProxyRoutes` forwards the requests of the routes dialects declare as
`ProxyRoute`s itself: it reads the body, finds the model, and hands the runner's
answer to hypercorn as it comes. Whatever needs Quart (CORS, a preload, a
refused key, a bad body, an unknown model or backend) goes to the app with the
body already read, so answers to those stay exactly the blueprints'.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Quart

from dmr.asgi_streams import (
    Receive,
    Send,
    read_body,
    replay,
    send_streamed,
    send_whole,
    unless_disconnected,
)
from dmr.direct_streams import hand_over
from dmr.error_bodies import openai_error_body
from dmr.errors import DmrError
from dmr.reference import display_name
from dmr.server.client_connections import transport_for
from dmr.server.metrics import METRICS_KEY, SCOPE_KEY, ASGIApp, RequestObservation
from dmr.server.model_names import resolve_model
from dmr.server.proxy import Exchange, open_exchange

if TYPE_CHECKING:
    from dmr.records import ApiDialect, ProxyRoute
    from dmr.server.metrics import ServerMetrics
    from dmr.server.services import Services
    from dmr.settings import Settings

__all__ = ["ProxyRoutes"]

log = logging.getLogger(__name__)


# Requests with these headers need Quart's hooks (CORS, the preload answer).
_NEEDS_APP = frozenset({b"origin", b"x-preload-only"})


@dataclass(frozen=True)
class _Target:
    dialect: str
    route: ProxyRoute
    rule: str  # as Quart writes the rule, for the request metrics' `route` label


class ProxyRoutes:
    """ASGI: forward plain requests of the dialects' proxy routes, the rest to `inner`."""

    def __init__(
        self, app: Quart, inner: ASGIApp, dialects: Sequence[ApiDialect], settings: Settings
    ) -> None:
        self.app = app
        self.inner = inner
        self.exact: dict[str, _Target] = {}
        self.templated: list[tuple[str, str, _Target]] = []  # (prefix, suffix, target)
        for dialect in dialects:
            prefix = (dialect.url_prefix or "").rstrip("/")
            for route in dialect.proxy_routes:
                for path in route.paths:
                    full = prefix + path
                    target = _Target(dialect.name, route, full.replace("{backend}", "<backend>"))
                    if "{backend}" in full:
                        before, _, after = full.partition("{backend}")
                        self.templated.append((before, after, target))
                    else:
                        self.exact[full] = target
        self.expected_key = settings.api_key.encode() if settings.api_key else None
        self.max_body_bytes = settings.max_body_bytes

    def match(self, path: str) -> tuple[_Target, str | None] | None:
        """The route `path` belongs to and the backend it names, if any."""
        target = self.exact.get(path)
        if target is not None:
            return target, None
        for before, after, target in self.templated:
            if path.startswith(before) and path.endswith(after):
                backend = path[len(before) : len(path) - len(after)]
                if backend and "/" not in backend:
                    return target, backend
        return None

    async def __call__(
        self, asgi_scope: Scope, asgi_receive: ASGIReceiveCallable, asgi_send: ASGISendCallable
    ) -> None:
        # Plain dicts and callables from here: the messages sent are few and fixed.
        scope = cast(dict[str, Any], asgi_scope)
        receive, send = cast(Receive, asgi_receive), cast(Send, asgi_send)
        matched = None
        if scope["type"] == "http" and scope.get("method") == "POST":
            matched = self.match(scope.get("path", ""))
        if matched is None or not self._plain(scope):
            await self.inner(asgi_scope, asgi_receive, asgi_send)
            return
        raw = await read_body(receive)
        if raw is None:
            return  # the client left before sending its request
        target, backend = matched
        services: Services | None = self.app.extensions.get("dmr")
        name = _model_name(raw)
        resolved = None
        known_backend = services is not None and (backend is None or backend in services.engines)
        if services is not None and name is not None and known_backend:
            # Any failure (no such model, a name no store path can hold) is the view's to
            # answer, in the dialect's shape.
            with contextlib.suppress(Exception):
                resolved, _ = resolve_model(services.store, name)
        if services is None or resolved is None:
            replayed = cast(ASGIReceiveCallable, replay(raw, receive))
            await self.inner(asgi_scope, replayed, asgi_send)
            return
        observation = scope.get(SCOPE_KEY)
        if isinstance(observation, RequestObservation):
            observation.route = target.rule
            observation.dialect = target.dialect
            observation.model = display_name(resolved)
        client = transport_for(scope)
        opening = open_exchange(
            services,
            model=resolved,
            mode=target.route.mode,
            path=target.route.runner_path,
            body=raw,
            backend=backend or target.route.default_backend,
            extensions=self.app.extensions,
            direct=client is not None,
        )
        try:
            # A whole answer is read from the runner before anything is sent: a client
            # that leaves meanwhile must still stop the generation (closing the runner
            # connection does) rather than leave it running to `max_tokens`.
            exchange = await unless_disconnected(opening, receive)
        except Exception as error:
            await self._send_error(send, error)
            return
        if exchange is None:
            log.info("client left before %s's answer; its generation was stopped", resolved)
            return
        metrics: ServerMetrics | None = self.app.extensions.get(METRICS_KEY)
        noted = None
        if metrics is not None:
            counter = metrics.direct_streams
            model = display_name(resolved)

            def noted(handed: bool) -> None:
                counter.labels(model, "true" if handed else "false").inc()

        await _forward(exchange, receive, send, client, noted)

    def _plain(self, scope: dict[str, Any]) -> bool:
        """Whether the request needs nothing of the app's hooks, from its headers alone."""
        length: int | None = None
        key: bytes | None = None
        for name, value in scope.get("headers", ()):
            if name in _NEEDS_APP:
                return False
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return False
            elif name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and token.strip():
                    key = token.strip()
            elif name == b"x-api-key" and key is None:
                key = value
        if key is not None:  # as the app's check reads it: latin-1 text, compared as UTF-8
            key = key.decode("latin-1").encode()
        # A chunked body has no length: the app's reader enforces the size limit.
        if length is None or length > self.max_body_bytes:
            return False
        if self.expected_key is None:
            return True
        # compare_digest takes the same time wherever the keys first differ.
        return key is not None and hmac.compare_digest(key, self.expected_key)

    async def _send_error(self, send: Send, error: Exception) -> None:
        """The answer the OpenAI blueprint's error handler gives the same failure."""
        if isinstance(error, DmrError):
            dmr_error = error
        else:
            log.exception("unexpected error forwarding a request", exc_info=error)
            dmr_error = DmrError(f"internal error: {type(error).__name__}: {error}")
        # As `jsonify` writes it outside debug mode.
        text = self.app.json.dumps(openai_error_body(dmr_error), separators=(",", ":"))
        body = (text + "\n").encode()
        headers = [(b"content-type", b"application/json")]
        retry_after = getattr(dmr_error, "retry_after", None)
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        await send_whole(send, dmr_error.status, body, headers)


def _model_name(raw: bytes) -> str | None:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model.strip() if isinstance(model, str) and model.strip() else None


async def _forward(
    exchange: Exchange,
    receive: Receive,
    send: Send,
    client: asyncio.Transport | None,
    noted: Callable[[bool], None] | None,
) -> None:
    headers = [(name.encode(), value.encode()) for name, value in exchange.headers.items()]
    if exchange.chunks is None:
        await send_whole(send, exchange.status, exchange.content or b"", headers)
        return
    chunks = exchange.chunks
    if exchange.direct is not None and client is not None:
        chunks = _handing_over(chunks, exchange.direct, client, noted)
    # A client that leaves closes the stream: the runner connection closes with it,
    # which stops the generation and frees its slot; `aclose` gives the lease back.
    try:
        await send_streamed(chunks, receive, send, exchange.status, headers)
    finally:
        await exchange.aclose()


async def _handing_over(
    chunks: AsyncIterator[bytes],
    direct: tuple[str, str],
    client: asyncio.Transport,
    noted: Callable[[bool], None] | None,
) -> AsyncIterator[bytes]:
    """`chunks`, with the client's socket handed to the runner after the first one
    (dmr/direct_streams.py); what comes after it is the runner's summary, or on a
    refusal the rest of the stream."""
    box, token = direct
    iterator = aiter(chunks)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        return
    yield first
    # Resumed for the next chunk: hypercorn has taken the first one. Only once all of
    # it is in the socket may the runner write after it.
    sock = client.get_extra_info("socket")
    ready = sock is not None and not client.is_closing() and client.get_write_buffer_size() == 0
    handed = await hand_over(box, token, sock.fileno() if ready else None) and ready
    if noted is not None:
        noted(handed)
    async for chunk in iterator:
        yield chunk
