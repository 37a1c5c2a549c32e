"""Model management routes (docs/compatibility.md §4): list, inspect, delete, tag, load, export,
repackage, purge, and the NDJSON-streamed create (pull) and push."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast
from urllib.parse import unquote

from quart import Blueprint, Quart, Response, request
from quart.blueprints import BlueprintSetupState

from dmr.errors import DmrError, InvalidRequestError
from dmr.records import ProgressEvent
from dmr.reference import InvalidReferenceError, parse_reference
from dmr.server.body_limit import lift_body_limit
from dmr.server.metrics import counting_pull_bytes
from dmr.server.services import get_services
from dmr.server.uploads import BackpressureHTTPConnection
from dmr.store import Store, StoredModel, normalise_tag

__all__ = ["blueprint"]

log = logging.getLogger(__name__)
blueprint = Blueprint("dmr_models_api", __name__)

LOAD_PATH = "/models/load"
NDJSON = "application/x-ndjson"


def _is_model_upload(method: str, path: str) -> bool:
    """`POST /models/load`: a model tarball is gigabytes, and the route streams it to
    disk chunk by chunk, its body bounded in memory (dmr.server.uploads)."""
    return method == "POST" and path.rstrip("/") == LOAD_PATH


@blueprint.record_once
def _allow_large_load(state: BlueprintSetupState) -> None:
    app = cast(Quart, state.app)
    lift_body_limit(app, "model_load", _is_model_upload, bounded=True)
    app.asgi_http_class = BackpressureHTTPConnection


def _store() -> Store:
    return get_services().store


async def _json_body(*fields: str) -> dict[str, Any]:
    raw = await request.get_data()
    if not raw:
        if fields:
            raise InvalidRequestError(f"request body must be JSON with {', '.join(fields)}")
        return {}
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise InvalidRequestError(f"request body is not valid JSON: {error}") from error
    except RecursionError:
        # `[[[[...` a few thousand deep fits well under the body cap.
        raise InvalidRequestError("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    missing = [name for name in fields if not body.get(name)]
    if missing:
        raise InvalidRequestError(f"request body misses {', '.join(missing)}")
    return body


def _bearer_token(body: dict[str, Any]) -> str | None:
    token = body.get("bearer-token")
    if token is not None and not isinstance(token, str):
        # Caught here: deep in the transfer it would fail as a header-encoding error.
        raise InvalidRequestError("'bearer-token' must be a string")
    if token and not (token.isascii() and token.isprintable()):
        raise InvalidRequestError("'bearer-token' must be printable ASCII")
    return token or None


def _flag(name: str) -> bool:
    return request.args.get(name, "").lower() in {"1", "true", "yes"}


def _name(name: str) -> str:
    # Clients may percent-encode the slashes and colons of a name.
    return unquote(name)


# --------------------------------------------------------------------------- reading


@blueprint.get("/models")
async def list_models() -> Response:
    models = await asyncio.to_thread(_store().list_models)
    return _json([model.api_json() for model in models])


@blueprint.get("/models/<path:name>")
async def inspect_model(name: str) -> Response:
    if _flag("remote"):
        return _json(await _inspect_remote(_name(name)))
    model = await asyncio.to_thread(_store().get, _name(name))
    return _json(model.api_json())


async def _inspect_remote(name: str) -> dict[str, Any]:
    """The registry's manifest and config of `name`, without pulling (`?remote=true`)."""
    from dmr.distribution.oci import inspect_remote_blocking

    try:
        reference = parse_reference(name)
    except InvalidReferenceError as error:
        raise InvalidRequestError(str(error)) from error
    if reference.is_huggingface:
        raise InvalidRequestError(
            f"{name} is a Hugging Face repository: remote inspection reads OCI registries"
        )
    return await asyncio.to_thread(inspect_remote_blocking, reference)


# --------------------------------------------------------------------------- changing


@blueprint.delete("/models/purge")
async def purge() -> Response:
    await asyncio.to_thread(_store().purge)
    return _json({"message": "model store purged"})


@blueprint.delete("/models/<path:name>")
async def delete_model(name: str) -> Response:
    report = await asyncio.to_thread(_store().delete, _name(name), _flag("force"))
    return _json(report)


@blueprint.post("/models/<path:name>/tag")
async def tag_model(name: str) -> Response:
    repo = request.args.get("repo", "").strip()
    tag = request.args.get("tag", "").strip()
    if not repo:
        raise InvalidRequestError("missing query parameter repo")
    target = f"{repo}:{tag}" if tag else repo
    familiar = normalise_tag(target)
    await asyncio.to_thread(_store().tag, _name(name), familiar)
    return _json({"message": f"Model tagged successfully with {familiar}", "target": familiar}, 201)


@blueprint.post("/models/<path:name>/repackage")
async def repackage_model(name: str) -> Response:
    from dmr.distribution.packaging import PackageOptions, repackage, write_to_store

    body = await _json_body("target")
    context_size = body.get("context_size")
    if context_size is not None and (not isinstance(context_size, int) or context_size <= 0):
        raise InvalidRequestError("context_size must be a positive integer")
    target = body["target"]
    if not isinstance(target, str):
        raise InvalidRequestError("target must be a model name")
    store = _store()

    def work() -> StoredModel:
        source = store.get(_name(name))
        artifact = repackage(store, source, PackageOptions(context_size=context_size))
        return write_to_store(store, artifact, [target])

    model = await asyncio.to_thread(work)
    return _json(
        {"message": f"Model repackaged as {target}", "id": model.id, "target": target}, 201
    )


@blueprint.post(LOAD_PATH)
async def load_model() -> Response:
    """Body: a model tarball, consumed as it arrives (never held whole)."""
    from dmr.distribution.tarball import TarLoader

    tags = [t for t in request.args.getlist("tag") if t]
    store = _store()
    loader = TarLoader(store, tags=tags)
    try:
        async for chunk in request.body:
            await asyncio.to_thread(loader.feed, chunk)
        model = await asyncio.to_thread(loader.finish)
    except BaseException:
        await asyncio.to_thread(loader.abort)
        raise
    return _json(model.api_json(), 201)


@blueprint.get("/models/<path:name>/export")
async def export_model(name: str) -> Response:
    from dmr.distribution.tarball import iter_model_tar

    store = _store()
    model = await asyncio.to_thread(store.get, _name(name))
    chunks = iter_model_tar(store, model)

    async def stream() -> AsyncIterator[bytes]:
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                return
            yield chunk

    filename = model.name.replace("/", "_").replace(":", "_") + ".tar"
    response = Response(stream(), mimetype="application/x-tar")
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# --------------------------------------------------------------------------- transfers


async def _ndjson_transfer(
    mode: str, run: Callable[[Callable[[ProgressEvent], None]], Awaitable[str]]
) -> Response:
    """Stream progress lines while `run` works; the last line says how it ended.

    A failure before the first progress line (bad name, unknown config media type,
    model not found) is answered with its own HTTP status (422, 404, ...), as DMR
    does; once lines flow, errors become the final `error` line.
    """
    queue: asyncio.Queue[ProgressEvent | None] = asyncio.Queue()
    failure: list[BaseException] = []

    async def work() -> None:
        try:
            message = await run(queue.put_nowait)
            queue.put_nowait(ProgressEvent(type="success", message=message, mode=mode))
        except Exception as error:
            failure.append(error)
        finally:
            queue.put_nowait(None)

    task = asyncio.ensure_future(work())
    first = await queue.get()
    if first is None and failure and isinstance(failure[0], DmrError):
        raise failure[0]

    def error_line(error: BaseException) -> ProgressEvent:
        if not isinstance(error, DmrError):
            log.error("%s failed", mode, exc_info=error)
        message = error.message if isinstance(error, DmrError) else str(error)
        return ProgressEvent(type="error", message=message, mode=mode)

    async def stream() -> AsyncIterator[bytes]:
        event = first
        try:
            while event is not None:
                # Progress arrives in batches (`progress.LoopEmitter`): send each batch
                # as one write, not a write (and a client wake-up) per line.
                lines = [json.dumps(event.to_json()).encode()]
                while not queue.empty() and (event := queue.get_nowait()) is not None:
                    lines.append(json.dumps(event.to_json()).encode())
                yield b"\n".join(lines) + b"\n"
                if event is not None:
                    event = await queue.get()
            if failure:
                yield json.dumps(error_line(failure[0]).to_json()).encode() + b"\n"
        finally:
            if not task.done():
                task.cancel()  # the client went away: stop the transfer (it resumes later)

    return Response(stream(), mimetype=NDJSON)


@blueprint.post("/models/create")
async def create_model() -> Response:
    from dmr.distribution.service import pull_model, source_for

    body = await _json_body("from")
    reference = body["from"]
    if not isinstance(reference, str):
        raise InvalidRequestError("'from' must be a model reference")
    pm = get_services().plugins
    # A bad name gets a plain 400 before the progress stream starts; a plugin's own
    # scheme (`s3://...`) is that source's to judge.
    source_for(reference, pm)
    token = _bearer_token(body)
    store = _store()

    async def run(progress: Callable[[ProgressEvent], None]) -> str:
        progress = counting_pull_bytes(progress)
        model = await pull_model(store, reference, progress, bearer_token=token, pm=pm)
        return f"Model pulled successfully: {model.name} ({model.id})"

    return await _ndjson_transfer("pull", run)


@blueprint.post("/models/<path:name>/push")
async def push(name: str) -> Response:
    from dmr.distribution.service import push_model

    body = await _json_body()
    token = _bearer_token(body)
    store = _store()
    model_name = _name(name)
    await asyncio.to_thread(store.get, model_name)  # 404 before the stream starts

    async def run(progress: Callable[[ProgressEvent], None]) -> str:
        await push_model(store, model_name, progress, bearer_token=token)
        return f"Model pushed successfully: {model_name}"

    return await _ndjson_transfer("push", run)


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")
