"""The app factory: core routes, plugin dialects, services built before serving."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import pluggy
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from dmr import plugins
from dmr.error_bodies import openai_error_body
from dmr.errors import DmrError, PayloadTooLargeError
from dmr.server import backends_api, engines_api, models_api, openapi, root, ui
from dmr.server.arrivals import ArrivalsMiddleware
from dmr.server.error_responses import error_json_response
from dmr.server.observability import install_observability
from dmr.server.security import install_security
from dmr.server.services import Services
from dmr.settings import Settings

__all__ = ["STARTUP_ERROR", "create_app"]

# `app.extensions` key of the message of a start-up that failed (see `start_services`).
STARTUP_ERROR = "dmr_startup_error"

log = logging.getLogger(__name__)


_DRAIN_LIMIT_BYTES = 1 << 20
_DRAIN_TIMEOUT_SECONDS = 5.0


def create_app(settings: Settings | None = None, pm: pluggy.PluginManager | None = None) -> Quart:
    settings = settings or Settings.from_env()
    pm = pm or plugins.get_plugin_manager()
    app = Quart("dmr")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["DMR_SETTINGS"] = settings
    app.config["DMR_PLUGIN_MANAGER"] = pm
    install_security(app, settings)

    core_blueprints = (
        root.blueprint,
        models_api.blueprint,
        engines_api.blueprint,
        backends_api.blueprint,
        ui.blueprint,
        openapi.blueprint,
    )
    for blueprint in core_blueprints:
        app.register_blueprint(blueprint)
    dialects = plugins.api_dialects(pm)
    for dialect in dialects:
        app.register_blueprint(dialect.blueprint, url_prefix=dialect.url_prefix)
    if any(dialect.proxy_routes for dialect in dialects):
        # Inside the observing middleware, so forwarded requests are measured too.
        from dmr.server.proxy_routes import ProxyRoutes

        app.asgi_app = ProxyRoutes(app, app.asgi_app, dialects, settings)  # type: ignore[method-assign,assignment]
    install_observability(app, settings, list(dialects))
    # Outermost: a request counts as it reaches the server (dmr/server/arrivals.py).
    app.asgi_app = ArrivalsMiddleware(app.asgi_app)  # type: ignore[method-assign]

    @app.after_request
    async def read_the_rest_of_the_body(response: Response) -> Response:
        # An answer given before the body was read (an unknown backend's 404, a 401)
        # leaves the body on the connection, and h11 then closes it without saying
        # so: a client reusing the connection sees "server disconnected". Small
        # bodies are read first (Quart keeps what a handler already read).
        length = request.content_length
        if length and length <= _DRAIN_LIMIT_BYTES:
            try:
                await asyncio.wait_for(request.get_data(), _DRAIN_TIMEOUT_SECONDS)
            except (TimeoutError, HTTPException):
                response.headers["Connection"] = "close"
        return response

    @app.errorhandler(DmrError)
    async def handle_dmr_error(error: DmrError) -> Response:
        return error_json_response(error, openai_error_body(error))

    @app.errorhandler(413)
    async def handle_too_large(_: Exception) -> Response:
        limit = settings.max_body_bytes
        return await handle_dmr_error(
            PayloadTooLargeError(f"request body larger than the {limit} byte limit")
        )

    @app.errorhandler(HTTPException)
    async def handle_http_error(error: HTTPException) -> Response:
        # Routing failures (no such route, wrong method) happen before any
        # blueprint is chosen, so dialects' own handlers never see them and
        # werkzeug would answer HTML: hand them to the handler of the
        # blueprint the path belongs to, else answer in OpenAI's shape.
        handler = _blueprint_handler(app, request.path, error)
        if handler is not None:
            return cast(Response, await app.ensure_async(handler)(error))
        status = error.code or 500
        http_error = DmrError(error.description or HTTPStatus(status).phrase)
        http_error.status = status
        http_error.code = HTTPStatus(status).phrase.lower().replace(" ", "_")
        http_error.error_type = "invalid_request_error" if status < 500 else "server_error"
        return await handle_dmr_error(http_error)

    @app.before_serving
    async def start_services() -> None:
        try:
            services = await build_services(settings, pm)
            app.extensions["dmr"] = services
            await services.scheduler.start()
        except DmrError as error:
            # hypercorn reports a failed start-up as its own error: `run_server` says
            # this one instead (an unreachable cluster, a missing plugin).
            app.extensions[STARTUP_ERROR] = error.message
            raise
        for result in pm.hook.dmr_server_startup(app=app):
            await plugins.resolve(result)

    @app.after_serving
    async def stop_services() -> None:
        # Plugins stop first, while runners still answer: work they stop (a batch)
        # must not see the scheduler refusing it as a failure of its own.
        for result in pm.hook.dmr_server_shutdown(app=app):
            await plugins.resolve(result)
        services: Services | None = app.extensions.get("dmr")
        if services is not None:
            await services.scheduler.aclose()

    return app


def _blueprint_handler(
    app: Quart, path: str, error: HTTPException
) -> Callable[[HTTPException], Any] | None:
    """The error handler the blueprint owning `path` registered for `error`, if any."""
    owner: str | None = None
    if isinstance(error, MethodNotAllowed):
        adapter = app.url_map.bind("localhost")
        for method in sorted(error.valid_methods or ()):
            try:
                endpoint, _ = adapter.match(path, method=method)
            except HTTPException:
                continue
            owner = str(endpoint).rpartition(".")[0] or None
            break
    if owner is None:
        for name, blueprint in app.blueprints.items():
            prefix = (blueprint.url_prefix or "").rstrip("/")
            if prefix and (path == prefix or path.startswith(prefix + "/")):
                owner = name
                break
    if owner is None:
        return None
    scoped = app.error_handler_spec.get(owner, {})
    for key in (error.code, None):
        handlers = scoped.get(key, {})
        for cls in type(error).__mro__:
            if cls in handlers:
                return cast(Callable[[HTTPException], Any], handlers[cls])
    return None


async def build_services(settings: Settings, pm: pluggy.PluginManager) -> Services:
    from dmr.scheduler import Scheduler
    from dmr.store import Store

    store = Store.open(settings.models_path)
    engines = {spec.name: spec for spec in plugins.engines(pm)}
    devices = await plugins.probe_hardware(pm)
    formats = plugins.model_formats(pm)  # this manager's, not the process-wide one
    placement = plugins.runner_placement(settings, pm)
    if settings.ray_address and placement is None:
        raise DmrError(
            f"DMR_RAY_ADDRESS / --ray-address ({settings.ray_address}) needs the dmr-ray"
            " plugin: pip install -e plugins/ray (docs/cluster.md)"
        )
    scheduler = Scheduler(
        settings=settings,
        store=store,
        engines=engines,
        devices=devices,
        formats=formats,
        placement=placement,
    )
    return Services(
        settings=settings,
        plugins=pm,
        store=store,
        scheduler=scheduler,
        engines=engines,
        devices=devices,
    )
