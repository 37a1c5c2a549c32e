"""The dialect kit: what an API dialect's views need, and a plugin's CLI command
(docs/plugins.md, "The dialect kit").

    from dmr.sdk.dialect import get_services, proxy_to_runner, resolve_model

In a view (a request of the server's app):
- `get_services()` is the server's `Services` (`store`, `scheduler`, `settings`,
  `engines`, `devices`, `extras` for a plugin's own objects); `services_for(app)`
  the same outside a request, as in `dmr_server_startup(app)`;
- `resolve_model(store, name)` finds a client's model name in the store (tags,
  bare names, IDs, Ollama's `smollm2:latest`): (the name to hand the scheduler,
  the `StoredModel`), or `ModelNotFoundError`;
- `call_runner(model, mode, path, payload)` posts to the model's runner and answers
  its JSON object (`RunnerCall`: `body`, `load_seconds`); `stream_runner(...)`
  answers a `RunnerStream` whose `events()` are the decoded SSE events of a
  streamed answer; `proxy_to_runner(...)` forwards a request and the runner's
  answer back byte for byte, as a Quart response; `open_exchange(services, ...)`
  is that answer as an `Exchange`, for a dialect that sends the bytes itself. All
  four take one path: they load the runner if needed, wait their turn, record the
  exchange for `GET /engines/requests`, label the request's metrics with the
  model, and raise a runner's error answer as a `DmrError` with its status
  (`runner_error(status, body)`);
- `openai_error_body(error)` / `openai_error(...)` are OpenAI's error shape, and
  `error_json_response(error, body)` answers a `DmrError` with a body of any shape
  (its status, and `Retry-After` when it has one);
  `lift_body_limit(app, name, is_upload)` lifts the request body cap for upload
  routes; `register_collector(app, collector)` adds series to `GET /metrics`;
- `pull_model`, `push_model` and `package_gguf` pull, push and package models
  (import them inside the view: they load registry and packaging code);
- `parse_reference`, `display_name`, `InvalidReferenceError` read model
  references, `parse_duration` Go durations (`5m`, Ollama's `keep_alive`), and
  `sniff_media_type` names an image by its bytes.

A plugin's `dmr.cli` command talks to the server with `connect()` (a
`ServerClient`; `HTTPError` when it cannot) and ends in error with `fail(message)`
(`error_message(response)` reads the server's error answer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmr.sdk._lazy import lazy_exports

if TYPE_CHECKING:
    from dmr.cli.client import connect
    from dmr.cli.errors import error_message, fail
    from dmr.cli.http import HTTPError, ServerClient, ServerResponse
    from dmr.distribution.packaging import package_gguf
    from dmr.distribution.service import pull_model, push_model
    from dmr.durations import parse_duration
    from dmr.error_bodies import openai_error, openai_error_body
    from dmr.image_types import SUPPORTED_FORMATS, SUPPORTED_MEDIA_TYPES, sniff_media_type
    from dmr.reference import InvalidReferenceError, ModelReference, display_name, parse_reference
    from dmr.server.body_limit import lift_body_limit
    from dmr.server.error_responses import error_json_response
    from dmr.server.metrics import register_collector
    from dmr.server.model_names import resolve_model
    from dmr.server.proxy import Exchange, open_exchange, proxy_to_runner
    from dmr.server.runner_calls import (
        RunnerCall,
        RunnerStream,
        call_runner,
        runner_error,
        stream_runner,
    )
    from dmr.server.services import Services, get_services, services_for

__all__ = [
    "SUPPORTED_FORMATS",
    "SUPPORTED_MEDIA_TYPES",
    "Exchange",
    "HTTPError",
    "InvalidReferenceError",
    "ModelReference",
    "RunnerCall",
    "RunnerStream",
    "ServerClient",
    "ServerResponse",
    "Services",
    "call_runner",
    "connect",
    "display_name",
    "error_json_response",
    "error_message",
    "fail",
    "get_services",
    "lift_body_limit",
    "open_exchange",
    "openai_error",
    "openai_error_body",
    "package_gguf",
    "parse_duration",
    "parse_reference",
    "proxy_to_runner",
    "pull_model",
    "push_model",
    "register_collector",
    "resolve_model",
    "runner_error",
    "services_for",
    "sniff_media_type",
    "stream_runner",
]

if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, __file__)
