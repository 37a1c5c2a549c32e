"""Ollama's model-management routes: tags, show, ps, copy, delete, pull, push,
create and blob uploads, on top of the store, the scheduler and distribution."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmr.sdk import DmrError, InvalidRequestError, ProgressEvent
from dmr.sdk.dialect import (
    InvalidReferenceError,
    display_name,
    get_services,
    lift_body_limit,
    parse_reference,
)
from quart import Blueprint, Quart, Response, jsonify, request

from dmr_apis.common.body import optional_bool, read_json_object
from dmr_apis.common.model_lookup import resolve_model
from dmr_apis.common.streaming import ndjson_line, stream_response
from dmr_apis.ollama.translate import iso_time

if TYPE_CHECKING:
    from dmr.sdk import Store, StoredModel

__all__ = ["allow_large_blob_uploads", "ollama_defaults", "register_routes"]

NDJSON = "application/x-ndjson"
GGUF_MEDIA_TYPE = "application/vnd.docker.ai.gguf.v3"
TEMPLATE_MEDIA_TYPE = "application/vnd.docker.ai.chat.template.jinja"
CONFIG_MEDIA_TYPE = "application/vnd.docker.ai.model.config.v0.1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
_BLOB_PATH = re.compile(r"^/api/blobs/sha256[:-]([a-f0-9]{64})$")
# Ollama shows models that never unload as expiring in a far future year.
_NEVER = datetime(2318, 1, 1, tzinfo=UTC)


def _model_name(body: Mapping[str, Any]) -> str:
    """Ollama clients send `model`; older ones send `name`."""
    for field in ("model", "name"):
        value = body.get(field)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if value is not None and not isinstance(value, str):
            raise InvalidRequestError(f"'{field}' must be a string")
    raise InvalidRequestError("missing required field 'model'")


def _familiar(name: str) -> str:
    try:
        return parse_reference(name).familiar
    except (InvalidReferenceError, ValueError) as error:
        raise InvalidRequestError(f"invalid model name {name!r}: {error}") from None


def _size(model: Any) -> int:
    return sum(int(layer.get("size", 0)) for layer in model.manifest.get("layers", ()))


def _details(model: Any) -> dict[str, Any]:
    config = model.model_config
    architecture = str(config.get("architecture") or "")
    return {
        "parent_model": "",
        "format": model.format or "gguf",
        "family": architecture,
        "families": [architecture] if architecture else None,
        "parameter_size": str(config.get("parameters") or ""),
        "quantization_level": str(config.get("quantization") or ""),
    }


def ollama_defaults(model: Any) -> dict[str, Any]:
    """The system prompt and parameters `/api/create` saved in the model's config."""
    saved = model.model_config.get("ollama")
    return dict(saved) if isinstance(saved, Mapping) else {}


def _tag_entry(model: Any, tag: str) -> dict[str, Any]:
    return {
        "name": tag,
        "model": tag,
        "modified_at": iso_time(float(model.created)),
        "size": _size(model),
        "digest": model.id.removeprefix("sha256:"),
        "details": _details(model),
    }


async def tags() -> Response:
    entries = []
    for model in get_services().store.list_models():
        for tag in model.tags or (model.id,):
            entries.append(_tag_entry(model, tag))
    return jsonify({"models": entries})


def _chat_template(model: Any) -> str:
    """What `/api/show` reports: a Go template as `/api/create` received it, else Jinja."""
    go_template = ollama_defaults(model).get("template")
    if isinstance(go_template, str) and go_template:
        return go_template
    path = model.chat_template_path() if hasattr(model, "chat_template_path") else None
    if path is not None:
        with contextlib.suppress(OSError):
            return str(path.read_text())
    gguf = model.model_config.get("gguf") or {}
    return str(gguf.get("tokenizer.chat_template") or "")


def _capabilities(model: StoredModel, template: str) -> list[str]:
    capabilities = ["completion"]
    if "tools" in template:
        capabilities.append("tools")
    if "think" in template:
        capabilities.append("thinking")
    capabilities += model.capabilities  # "vision" with a projector
    return capabilities


async def show() -> Response:
    _, body = await read_json_object()
    name, model = resolve_model(_model_name(body))
    template = _chat_template(model)
    defaults = ollama_defaults(model)
    parameters = defaults.get("parameters") or {}
    parameter_lines = "\n".join(
        f"{key} {json.dumps(value) if isinstance(value, str) else value}"
        for key, values in parameters.items()
        for value in (values if isinstance(values, list) else [values])
    )
    modelfile = [f"# Modelfile generated by dmr\nFROM {name}"]
    if template:
        modelfile.append(f'TEMPLATE """{template}"""')
    if defaults.get("system"):
        modelfile.append(f'SYSTEM """{defaults["system"]}"""')
    if parameter_lines:
        modelfile.append("\n".join(f"PARAMETER {line}" for line in parameter_lines.splitlines()))
    config = model.model_config
    model_info: dict[str, Any] = {
        key: value
        for key, value in (config.get("gguf") or {}).items()
        if key != "tokenizer.chat_template"  # shown as `template`; it is long
    }
    if config.get("architecture"):
        model_info.setdefault("general.architecture", config["architecture"])
    if config.get("context_size"):
        model_info.setdefault("context_length", config["context_size"])
    return jsonify(
        {
            "modelfile": "\n".join(modelfile) + "\n",
            "parameters": parameter_lines,
            "template": template,
            "system": defaults.get("system") or "",
            "details": _details(model),
            "model_info": model_info,
            "capabilities": _capabilities(model, template),
            "modified_at": iso_time(float(model.created)),
        }
    )


def _as_timestamp(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _as_seconds(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        from dmr.sdk.dialect import parse_duration

        with contextlib.suppress(ValueError):
            return parse_duration(value)
    return None


def _listed_name(name: str, model: StoredModel | None) -> str:
    """The runner's model as `/api/tags` lists it (`ai/smollm2:latest`, not the
    scheduler's `ai/smollm2`): Open WebUI matches `/api/ps` to `/api/tags` by name."""
    if model is None or not model.tags:
        return name
    wanted = display_name(name)
    return next((tag for tag in model.tags if display_name(tag) == wanted), model.tags[0])


async def ps() -> Response:
    services = get_services()
    # A runner's memory is VRAM only on a GPU; the CPU's device name is the processor's.
    gpus = {device.name for device in services.devices if device.is_gpu}
    # Ollama lists a model once; dmr may run it twice (a chat and an embedding runner):
    # one entry, with their memory added up and the later expiry.
    entries: dict[str, dict[str, Any]] = {}
    for item in services.scheduler.ps():
        model = services.store.find(str(item.get("model_id") or item.get("model_name") or ""))
        name = _listed_name(str(item.get("model_name") or ""), model)
        keep_alive = _as_seconds(item.get("keep_alive"))
        if keep_alive is None:
            # The server default; its 0 means "never unload".
            keep_alive = services.settings.idle_timeout or -1.0
        last_used = _as_timestamp(item.get("last_used")) or time.time()
        if item.get("in_use") or item.get("loading"):
            last_used = time.time()
        expires = _NEVER if keep_alive < 0 else datetime.fromtimestamp(last_used + keep_alive, UTC)
        entry: dict[str, Any] = {
            "name": name,
            "model": name,
            "size": int(item.get("memory") or 0) or (_size(model) if model else 0),
            "digest": model.id.removeprefix("sha256:") if model else "",
            "details": _details(model) if model else {},
            "expires_at": iso_time(expires),
            "size_vram": int(item.get("memory") or 0) if item.get("device") in gpus else 0,
        }
        if "context_size" in item:
            entry["context_length"] = item["context_size"]
        seen = entries.get(name)
        if seen is not None:
            entry["size"] += seen["size"]
            entry["size_vram"] += seen["size_vram"]
            entry["expires_at"] = max(entry["expires_at"], seen["expires_at"])
        entries[name] = entry
    return jsonify({"models": list(entries.values())})


async def copy() -> Response:
    _, body = await read_json_object()
    source, destination = body.get("source"), body.get("destination")
    if not isinstance(source, str) or not source:
        raise InvalidRequestError("'source' must be a non-empty string")
    if not isinstance(destination, str) or not destination:
        raise InvalidRequestError("'destination' must be a non-empty string")
    name, _ = resolve_model(source)
    get_services().store.tag(name, _familiar(destination))
    return Response(status=200)


async def delete() -> Response:
    _, body = await read_json_object()
    requested = _model_name(body)
    name, model = resolve_model(requested)
    services = get_services()
    with contextlib.suppress(DmrError):
        await services.scheduler.unload(models=[name], cancel_busy=False)
    if len(model.tags) > 1 and name in model.tags:
        services.store.untag(name)  # other names still point at the model
    else:
        services.store.delete(name, force=True)
    return Response(status=200)


# ----------------------------------------------------------------------- pull / push


def _ollama_progress(event: ProgressEvent, verb: str) -> dict[str, Any]:
    if event.type == "error":
        return {"error": event.message}
    if event.layer_id:
        return {
            "status": f"{verb} {event.layer_id.removeprefix('sha256:')[:12]}",
            "digest": event.layer_id,
            "total": event.layer_size,
            "completed": event.layer_current,
        }
    return {"status": event.message}


async def _transfer(
    run: Callable[[Callable[[ProgressEvent], None]], Awaitable[Any]],
    *,
    verb: str,
    first_status: str,
    stream: bool,
) -> Response:
    """Run a pull/push, relaying its progress as Ollama status lines.

    Errors before any progress become a proper error status; later ones an
    `{"error"}` line, as Ollama does.
    """
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def progress(event: ProgressEvent) -> None:
        queue.put_nowait(_ollama_progress(event, verb))

    async def work() -> None:
        try:
            await run(progress)
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(work())
    if not stream:
        await task  # errors propagate to the dialect's error handler
        return jsonify({"status": "success"})
    # Wait for the first line or the end, so an early failure keeps its status code.
    first = await queue.get()
    if first is None and task.done() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]

    async def lines() -> AsyncIterator[bytes]:
        try:
            yield ndjson_line({"status": first_status})
            line = first
            while line is not None:
                yield ndjson_line(line)
                line = await queue.get()
            error = task.exception()
            if error is not None:
                yield ndjson_line({"error": str(error)})
                return
            yield ndjson_line({"status": "success"})
        finally:
            if not task.done():
                task.cancel()

    return stream_response(lines(), NDJSON)


async def pull() -> Response:
    _, body = await read_json_object()
    reference = _model_name(body)
    stream = optional_bool(body, "stream")
    from dmr.sdk.dialect import pull_model

    services = get_services()

    async def run(progress: Callable[[ProgressEvent], None]) -> Any:
        return await pull_model(services.store, reference, progress, pm=services.plugins)

    return await _transfer(
        run, verb="pulling", first_status="pulling manifest", stream=stream is not False
    )


async def push() -> Response:
    _, body = await read_json_object()
    name, _ = resolve_model(_model_name(body))
    stream = optional_bool(body, "stream")
    from dmr.sdk.dialect import push_model

    store = get_services().store

    async def run(progress: Callable[[ProgressEvent], None]) -> Any:
        return await push_model(store, name, progress)

    return await _transfer(
        run, verb="pushing", first_status="retrieving manifest", stream=stream is not False
    )


# ------------------------------------------------------------------------ blobs / create


def allow_large_blob_uploads(app: Quart) -> None:
    """GGUF uploads to `/api/blobs/...` are far above the 10 MiB JSON cap."""
    lift_body_limit(app, "ollama_blobs", _is_blob_upload)


def _is_blob_upload(method: str, path: str) -> bool:
    return method == "POST" and _BLOB_PATH.match(path) is not None


async def head_blob(digest_hex: str) -> Response:
    store = get_services().store
    return Response(status=200 if store.has_blob(f"sha256:{digest_hex}") else 404)


async def upload_blob(digest_hex: str) -> Response:
    digest = f"sha256:{digest_hex}"
    store = get_services().store
    if store.has_blob(digest):
        async for _ in request.body:  # drain chunk by chunk: get_data() would hold it whole
            pass
        return Response(status=201)
    # Ollama's client uploads with chunked encoding (no size known up front), so
    # the body is spooled beside the store, checked, then linked into the blobs.
    hasher = hashlib.sha256()
    spool_dir = Path(store.root)
    with tempfile.NamedTemporaryFile(dir=spool_dir, prefix=".upload-", delete=False) as spool:
        spool_path = Path(spool.name)
        try:
            async for chunk in request.body:
                hasher.update(chunk)
                spool.write(chunk)
        except BaseException:
            _discard(spool_path)
            raise
    try:
        if hasher.hexdigest() != digest_hex:
            raise InvalidRequestError(
                f"digest mismatch: body is sha256:{hasher.hexdigest()}, not {digest}"
            )
        await asyncio.to_thread(store.import_file, spool_path)
    finally:
        _discard(spool_path)
    return Response(status=201)


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)


def _check_parameters(parameters: Any) -> dict[str, Any]:
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidRequestError("'parameters' must be an object")
    return parameters


def _check_jinja(template: str) -> None:
    """A broken template fails here with a 400, not later in every chat with the model."""
    import jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError as error:
        raise InvalidRequestError(f"'template' is not a valid chat template: {error}") from None


def _jinja_and_go_template(template: str | None) -> tuple[str | None, str | None]:
    """(the Jinja template runners apply, the Go template a client wrote, kept for show)."""
    # Only `/api/create` translates templates: the translator is imported here, not
    # with the dialect at server start.
    from dmr_apis.ollama.go_template import GoTemplateError, go_to_jinja, looks_like_go_template

    go_template: str | None = None
    if template and looks_like_go_template(template):
        # Ollama clients write Go templates; runners apply Jinja. Keep the original for show.
        go_template = template
        try:
            template = go_to_jinja(template)
        except GoTemplateError as error:
            raise InvalidRequestError(f"'template': {error}") from None
    if template:
        _check_jinja(template)
    return template, go_template


async def _uploaded_gguf_layers(
    store: Store, files: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The layers of the GGUF blobs `files` names (uploaded before), and the config read
    from the first."""
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise InvalidRequestError("'files' must map file names to sha256 digests")
    ggufs = [(n, d) for n, d in files.items() if n.endswith(".gguf")]
    if not ggufs:
        raise InvalidRequestError("'files' must name at least one .gguf file")
    layers: list[dict[str, Any]] = []
    for file_name, digest in ggufs:
        if not store.has_blob(digest):
            raise InvalidRequestError(f"blob {digest} for {file_name} was not uploaded")
        size = store.blob_path(digest).stat().st_size
        layers.append({"mediaType": GGUF_MEDIA_TYPE, "digest": digest, "size": size})
    config = await asyncio.to_thread(_gguf_config, store.blob_path(ggufs[0][1]))
    return layers, config


def _add_created_model(
    store: Store, target: str, layers: list[dict[str, Any]], config: dict[str, Any]
) -> None:
    """The model's config (dated now, its rootfs the layers) and manifest stored and
    tagged `target`."""
    config.setdefault("descriptor", {})["created"] = iso_time()
    config["rootfs"] = {"type": "rootfs", "diff_ids": [layer["digest"] for layer in layers]}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = store.put_blob_bytes(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": layers,
    }
    store.add_model(json.dumps(manifest).encode(), [target])


async def create() -> Response:
    _, body = await read_json_object()
    target = _familiar(_model_name(body))
    stream = optional_bool(body, "stream")
    if body.get("quantize"):
        raise InvalidRequestError("'quantize' is not supported: dmr stores models as given")
    if body.get("adapters"):
        raise InvalidRequestError("'adapters' are not supported")
    files = body.get("files")
    base_name = body.get("from")
    system = body.get("system")
    parameters = _check_parameters(body.get("parameters"))
    for field in ("template", "system", "from"):
        if body.get(field) is not None and not isinstance(body.get(field), str):
            raise InvalidRequestError(f"'{field}' must be a string")
    template, go_template = _jinja_and_go_template(body.get("template"))
    store = get_services().store
    layers: list[dict[str, Any]] = []
    config: dict[str, Any]
    if files:
        layers, config = await _uploaded_gguf_layers(store, files)
    elif base_name:
        _, base = resolve_model(base_name)
        layers = [
            dict(layer)
            for layer in base.manifest.get("layers", ())
            if not (template and layer.get("mediaType") == TEMPLATE_MEDIA_TYPE)
        ]
        config = json.loads(json.dumps(base.config))
        previous = ollama_defaults(base)
        system = system if system is not None else previous.get("system")
        parameters = {**(previous.get("parameters") or {}), **parameters}
        if not template and previous.get("template"):
            go_template = previous["template"]
    else:
        raise InvalidRequestError("'from' or 'files' is required")
    if template:
        digest = store.put_blob_bytes(template.encode())
        layers.append(
            {"mediaType": TEMPLATE_MEDIA_TYPE, "digest": digest, "size": len(template.encode())}
        )
    block = config.setdefault("config", {})
    block.pop("ollama", None)
    if system or parameters or go_template:
        block["ollama"] = {"system": system or "", "parameters": parameters}
        if go_template:
            block["ollama"]["template"] = go_template
    _add_created_model(store, target, layers, config)
    statuses = ["parsing modelfile", "writing manifest", "success"]
    if stream is False:
        return jsonify({"status": "success"})

    async def lines() -> AsyncIterator[bytes]:
        for status in statuses:
            yield ndjson_line({"status": status})

    return stream_response(lines(), NDJSON)


def _gguf_config(path: Path) -> dict[str, Any]:
    """The OCI config (docs/compatibility.md §2) the packaging module writes for this GGUF."""
    from dmr.sdk.dialect import package_gguf

    config = json.loads(package_gguf([path]).config)
    return config if isinstance(config, dict) else {"config": {"format": "gguf"}}


def register_routes(blueprint: Blueprint) -> None:
    blueprint.add_url_rule("/tags", "tags", tags, methods=["GET"])
    blueprint.add_url_rule("/show", "show", show, methods=["POST"])
    blueprint.add_url_rule("/ps", "ps", ps, methods=["GET"])
    blueprint.add_url_rule("/copy", "copy", copy, methods=["POST"])
    blueprint.add_url_rule("/delete", "delete", delete, methods=["DELETE"])
    blueprint.add_url_rule("/pull", "pull", pull, methods=["POST"])
    blueprint.add_url_rule("/push", "push", push, methods=["POST"])
    blueprint.add_url_rule("/create", "create", create, methods=["POST"])
    blueprint.add_url_rule("/blobs/sha256:<digest_hex>", "head_blob", head_blob, methods=["HEAD"])
    blueprint.add_url_rule(
        "/blobs/sha256:<digest_hex>", "upload_blob", upload_blob, methods=["POST"]
    )
