"""The runner's HTTP app (Runner protocol, docs/architecture.md): Quart routes, one
blueprint per route family, behind the fast path for streamed generations."""

from __future__ import annotations

from dmr.sdk.runner import BadRequest, error_response
from quart import Quart, Response

from dmr_llamacpp.runner import generation_routes, pooling_routes, service_routes
from dmr_llamacpp.runner.priority import PriorityScope
from dmr_llamacpp.runner.state import RunnerState, install_state
from dmr_llamacpp.runner.streaming import StreamingRoutes

__all__ = ["RunnerState", "create_app", "create_asgi"]


async def _bad_request(error: BadRequest) -> Response:
    return error_response(error.message, 400, param=error.param)


def create_app(state: RunnerState) -> Quart:
    app = Quart(__name__)
    # Quart cuts responses off after 60 s by default; a long generation is not an error.
    app.config["RESPONSE_TIMEOUT"] = None
    install_state(app, state)
    app.register_error_handler(BadRequest, _bad_request)
    for routes in (service_routes, generation_routes, pooling_routes):
        app.register_blueprint(routes.blueprint)
    return app


def create_asgi(state: RunnerState) -> PriorityScope:
    """The runner's ASGI app: the Quart app behind the streaming fast path, each request
    marked batch work or not (runner/priority.py)."""
    routes = StreamingRoutes(create_app(state), generation_routes.streamed_answers(state))
    return PriorityScope(routes)
