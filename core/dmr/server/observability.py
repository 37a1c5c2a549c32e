"""Wires the metrics, the request recorder and the logs route into the app."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import Quart

from dmr.server import logs_api, metrics, recorder

if TYPE_CHECKING:
    from dmr.records import ApiDialect
    from dmr.settings import Settings

__all__ = ["install_observability"]


def install_observability(app: Quart, settings: Settings, dialects: list[ApiDialect]) -> None:
    request_recorder = recorder.RequestRecorder()
    app.extensions[recorder.RECORDER_KEY] = request_recorder
    observers = [request_recorder.add]
    app.register_blueprint(recorder.blueprint)
    app.register_blueprint(logs_api.blueprint)
    if not settings.disable_metrics:
        server_metrics = metrics.ServerMetrics({d.blueprint.name: d.name for d in dialects})
        app.extensions[metrics.METRICS_KEY] = server_metrics
        observers.append(server_metrics.observe_exchange)
        app.register_blueprint(metrics.blueprint)
        app.before_request(server_metrics.before_request)
        app.asgi_app = metrics.ObservingMiddleware(app.asgi_app, server_metrics)  # type: ignore[method-assign]
    app.extensions[recorder.OBSERVERS_KEY] = observers
