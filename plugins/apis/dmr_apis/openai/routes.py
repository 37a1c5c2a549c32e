"""The OpenAI dialect: `/engines[/{backend}]/v1/...` and the `/v1/...` aliases.

Inference bodies are parsed only to find the model; the raw bytes go to the
runner unchanged and its bytes (SSE included) come back unchanged.
"""

from __future__ import annotations

from typing import Any

from dmr.sdk import ApiDialect, Mode, ProxyRoute, hookimpl
from dmr.sdk.dialect import get_services
from quart import Blueprint, Response, jsonify, request

from dmr_apis.common.body import read_json_object, require_model
from dmr_apis.common.errors import install_error_handlers, openai_error_body
from dmr_apis.common.model_lookup import check_backend, resolve_model

__all__ = ["blueprint", "dmr_api_dialects"]

blueprint = Blueprint("dmr_apis_openai", __name__)
install_error_handlers(blueprint, openai_error_body)

# (route suffix after the engines prefix, runner path, mode, default backend)
_INFERENCE_ROUTES: tuple[tuple[str, str, Mode, str | None], ...] = (
    ("/v1/chat/completions", "/v1/chat/completions", Mode.COMPLETION, None),
    ("/v1/completions", "/v1/completions", Mode.COMPLETION, None),
    ("/v1/embeddings", "/v1/embeddings", Mode.EMBEDDING, None),
    ("/v1/images/generations", "/v1/images/generations", Mode.IMAGE_GENERATION, "diffusers"),
    ("/rerank", "/v1/rerank", Mode.RERANKING, None),
    ("/v1/rerank", "/v1/rerank", Mode.RERANKING, None),
    ("/score", "/v1/score", Mode.RERANKING, None),
    ("/v1/score", "/v1/score", Mode.RERANKING, None),
)


def _model_item(model: Any) -> dict[str, Any]:
    return {
        "id": model.tags[0] if model.tags else model.id,
        "object": "model",
        "created": model.created,
        "owned_by": "docker",
    }


async def list_models(backend: str | None = None) -> Response:
    check_backend(backend)
    models = get_services().store.list_models()
    return jsonify({"object": "list", "data": [_model_item(model) for model in models]})


async def get_model(name: str, backend: str | None = None) -> Response:
    check_backend(backend)
    _, model = resolve_model(name)
    return jsonify(_model_item(model))


for _prefix in ("/engines", "/engines/<backend>", ""):
    _key = _prefix.strip("/").replace("<backend>", "backend").replace("/", "_") or "root"
    blueprint.add_url_rule(
        f"{_prefix}/v1/models", f"list_models_{_key}", list_models, methods=["GET"]
    )
    blueprint.add_url_rule(
        f"{_prefix}/v1/models/<path:name>", f"get_model_{_key}", get_model, methods=["GET"]
    )


def _make_inference_view(runner_path: str, mode: Mode, default_backend: str | None) -> Any:
    async def inference(backend: str | None = None) -> Response:
        from dmr.sdk.dialect import proxy_to_runner

        check_backend(backend)
        raw, body = await read_json_object()
        name, _ = resolve_model(require_model(body))
        chosen_backend = backend or default_backend
        if request.headers.get("X-Preload-Only", "").strip().lower() == "true":
            await get_services().scheduler.preload(name, mode, backend=chosen_backend)
            return jsonify({"model": name, "status": "loaded"})
        response = await proxy_to_runner(
            model=name, mode=mode, path=runner_path, body=raw, backend=chosen_backend
        )
        # Quart cuts bodies at RESPONSE_TIMEOUT (60 s) by default; generations may be longer.
        response.timeout = None
        return response

    return inference


def _route_paths(suffix: str) -> tuple[str, ...]:
    paths = [f"/engines{suffix}", f"/engines/{{backend}}{suffix}"]
    if suffix.startswith("/v1/") or suffix in ("/rerank", "/score"):
        paths.append(suffix)
    return tuple(paths)


for _suffix, _runner_path, _mode, _default_backend in _INFERENCE_ROUTES:
    _view = _make_inference_view(_runner_path, _mode, _default_backend)
    _name = _suffix.strip("/").replace("/", "_")
    for _path in _route_paths(_suffix):
        _rule = _path.replace("{backend}", "<backend>")
        _endpoint = f"{_name}_{'backend' if '<backend>' in _rule else 'engines'}"
        if not _rule.startswith("/engines"):
            _endpoint = f"{_name}_alias"
        blueprint.add_url_rule(_rule, _endpoint, _view, methods=["POST"])


# The server forwards plain requests of these routes itself (`ProxyRoute`); the
# views above answer the rest, and every request when the server does not.
PROXY_ROUTES = tuple(
    ProxyRoute(_route_paths(suffix), runner_path, mode, default_backend)
    for suffix, runner_path, mode, default_backend in _INFERENCE_ROUTES
)


@hookimpl
def dmr_api_dialects() -> list[ApiDialect]:
    return [ApiDialect(name="openai", blueprint=blueprint, proxy_routes=PROXY_ROUTES)]
