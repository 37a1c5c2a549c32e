"""`POST /engines/install-backend` and `POST /engines/uninstall-backend`.

Docker Model Runner downloads a deferred backend (vLLM, diffusers) when asked
and deletes its files on uninstall (pkg/inference/scheduling/http_handler.go).
dmr's engines are Python plugins, installed into the server's environment and
loaded when it starts, so the server does not pip-install into itself: these
routes report what is installed and give the exact command for the rest.
Status codes are Docker Model Runner's (docs/compatibility.md §4):
- 400 (`backend is required`) for a body without a backend;
- 404 for a backend no plugin provides and dmr does not know;
- 200 when there is nothing to do: an installed backend to install, a missing
  one to uninstall;
- 500 `backend installation failed: ...` / `backend uninstall failed: ...` when
  the change needs a command and a restart, which the message gives.
A 200 is JSON `{"backend", "installed", "status", "message"}` (DMR's is empty);
errors are dmr's OpenAI-shaped error bodies, plus those fields on a 500 (DMR sends
text; the docker CLI shows the body of a failed call as it is).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pluggy
from quart import Blueprint, Response, request

from dmr.engine_install_hints import INSTALL_HINTS
from dmr.error_bodies import openai_error
from dmr.errors import InvalidRequestError, ModelNotFoundError
from dmr.server.services import get_services

if TYPE_CHECKING:
    from dmr.records import EngineSpec

__all__ = ["blueprint", "engine_distribution"]

blueprint = Blueprint("dmr_backends_api", __name__)

_MAX_BODY_BYTES = 64 * 1024


def engine_distribution(spec: EngineSpec, pm: pluggy.PluginManager) -> str | None:
    """The distribution that registered the engine's plugin, by the engine's package."""
    package = type(spec.engine).__module__.split(".")[0]
    for plugin, dist in pm.list_plugin_distinfo():
        name = getattr(plugin, "__name__", "")
        if isinstance(name, str) and name.split(".")[0] == package:
            return str(dist.project_name)
    return None


def _answer(status: int, backend: str, installed: bool, message: str, state: str) -> Response:
    body: dict[str, Any] = {
        "backend": backend,
        "installed": installed,
        "status": state,
        "message": message,
    }
    if status >= 400:
        body.update(openai_error(message, "server_error", code="backend_not_changed"))
    return Response(json.dumps(body), status=status, mimetype="application/json")


async def _backend_name() -> str:
    raw = await request.get_data()
    if len(raw) > _MAX_BODY_BYTES:
        raise InvalidRequestError("invalid request: the body is too large")
    try:
        body: Any = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):
        body = None
    backend = body.get("backend") if isinstance(body, dict) else None
    if not isinstance(backend, str) or not backend.strip():
        raise InvalidRequestError("invalid request: backend is required")
    return backend.strip()


def _unknown(backend: str) -> ModelNotFoundError:
    known = sorted({*get_services().engines, *INSTALL_HINTS})
    error = ModelNotFoundError(f"backend not found: {backend!r} (known: {', '.join(known)})")
    error.code = "backend_not_found"
    return error


def _engine_state(spec: EngineSpec) -> str:
    try:
        return spec.engine.status().render()
    except Exception as error:  # a broken engine plugin must not break the route
        return f"Error: {error}"


@blueprint.post("/engines/install-backend")
async def install_backend() -> Response:
    backend = await _backend_name()
    spec = get_services().engines.get(backend)
    if spec is not None:
        return _answer(200, backend, True, f"{backend} is installed", _engine_state(spec))
    hint = INSTALL_HINTS.get(backend)
    if hint is None:
        raise _unknown(backend)
    message = (
        f"backend installation failed: dmr's {backend} engine is a Python plugin that the"
        f" server loads when it starts; install it with `{hint}` (from a dmr checkout),"
        " then restart the server (`dmr restart-runner`)"
    )
    return _answer(500, backend, False, message, f"Not Installed: {hint}")


@blueprint.post("/engines/uninstall-backend")
async def uninstall_backend() -> Response:
    backend = await _backend_name()
    spec = get_services().engines.get(backend)
    if spec is None:
        hint = INSTALL_HINTS.get(backend)
        if hint is None:
            raise _unknown(backend)
        message = f"{backend} is not installed (nothing to remove)"
        return _answer(200, backend, False, message, f"Not Installed: {hint}")
    distribution = engine_distribution(spec, get_services().plugins)
    command = (
        f"`pip uninstall {distribution}`"
        if distribution
        else f"uninstalling the plugin that provides {backend!r}"
    )
    message = (
        f"backend uninstall failed: dmr's {backend} engine is a Python plugin loaded by the"
        f" running server; remove it with {command}, then restart the server"
        " (`dmr restart-runner`)"
    )
    return _answer(500, backend, True, message, _engine_state(spec))
