"""OpenAI's Files and Batch APIs: `/v1/files`, `/v1/batches` (and under `/engines/v1`).

Shapes and statuses as OpenAI defines them (docs/batch.md). The state lives in
`BatchService` and `FileStore`, under the store's folder, so it survives restarts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from dmr.sdk import ApiDialect, InvalidRequestError, PayloadTooLargeError, hookimpl
from dmr.sdk.dialect import get_services, lift_body_limit, register_collector, services_for
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from quart import Blueprint, Quart, Response, jsonify, request, send_file

from dmr_apis.batch.files import FileStore
from dmr_apis.batch.service import BatchService, BatchSettings
from dmr_apis.common.body import read_json_object
from dmr_apis.common.errors import install_error_handlers, openai_error_body

__all__ = ["blueprint", "dmr_api_dialects", "dmr_server_shutdown", "dmr_server_startup"]

blueprint = Blueprint("dmr_apis_batch", __name__)
install_error_handlers(blueprint, openai_error_body)

_PREFIXES = ("/v1", "/engines/v1")
_SERVICE = "batches"


def _service() -> BatchService:
    service = get_services().extras.get(_SERVICE)
    if not isinstance(service, BatchService):
        raise RuntimeError("the batch service has not started")
    return service


def _limit(default: int, largest: int) -> int:
    raw = request.args.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequestError(f"'limit' must be an integer, not {raw!r}") from None
    if not 1 <= value <= largest:
        raise InvalidRequestError(f"'limit' must be between 1 and {largest}, not {value}")
    return value


def _page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


# --------------------------------------------------------------------------- files


async def create_file() -> tuple[Response, int]:
    service = _service()
    limit = service.settings.max_file_bytes
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise PayloadTooLargeError(
            f"the file is larger than the {limit} byte limit (DMR_FILES_MAX_BYTES)"
        )
    form = await request.form
    uploads = await request.files
    purpose = form.get("purpose")
    if not purpose:
        raise InvalidRequestError("missing required field 'purpose'")
    upload = uploads.get("file")
    if upload is None:
        raise InvalidRequestError("missing required field 'file' (a multipart file part)")

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := upload.stream.read(1024 * 1024):
            yield chunk

    stored = await service.files.create(upload.filename or "file", purpose, chunks(), limit)
    return jsonify(stored.to_json()), 200


async def list_files() -> Response:
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError(f"'order' must be 'asc' or 'desc', not {order!r}")
    files = _service().files.list(
        purpose=request.args.get("purpose") or None, order=order, after=request.args.get("after")
    )
    return jsonify(_page([f.to_json() for f in files], _limit(10_000, 10_000)))


async def get_file(file_id: str) -> Response:
    return jsonify(_service().files.get(file_id).to_json())


async def file_content(file_id: str) -> Response:
    files = _service().files
    files.get(file_id)
    return await send_file(files.data_path(file_id), mimetype="application/octet-stream")


async def delete_file(file_id: str) -> Response:
    _service().files.delete(file_id)
    return jsonify({"id": file_id, "object": "file", "deleted": True})


# --------------------------------------------------------------------------- batches


async def create_batch() -> Response:
    _, body = await read_json_object()
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            raise InvalidRequestError(f"missing required string field '{name}'")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise InvalidRequestError("'metadata' must be an object of strings")
    batch = _service().create(
        input_file_id=body["input_file_id"],
        endpoint=body["endpoint"],
        completion_window=body["completion_window"],
        metadata=metadata,
    )
    return jsonify(batch)


async def list_batches() -> Response:
    batches = _service().newest_first()
    after = request.args.get("after")
    if after is not None:
        ids = [b["id"] for b in batches]
        batches = batches[ids.index(after) + 1 :] if after in ids else []
    return jsonify(_page(batches, _limit(20, 100)))


async def get_batch(batch_id: str) -> Response:
    return jsonify(_service().get(batch_id))


async def cancel_batch(batch_id: str) -> Response:
    return jsonify(_service().cancel(batch_id))


def _routes() -> Iterator[tuple[str, Any, str]]:
    yield "/files", create_file, "POST"
    yield "/files", list_files, "GET"
    yield "/files/<file_id>", get_file, "GET"
    yield "/files/<file_id>", delete_file, "DELETE"
    yield "/files/<file_id>/content", file_content, "GET"
    yield "/batches", create_batch, "POST"
    yield "/batches", list_batches, "GET"
    yield "/batches/<batch_id>", get_batch, "GET"
    yield "/batches/<batch_id>/cancel", cancel_batch, "POST"


for _prefix in _PREFIXES:
    for _path, _view, _method in _routes():
        blueprint.add_url_rule(
            _prefix + _path,
            endpoint=f"{_view.__name__}{_prefix.replace('/', '_')}",
            view_func=_view,
            methods=[_method],
        )


# --------------------------------------------------------------------------- hooks


class _BatchMetrics:
    def __init__(self, service: BatchService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "dmr_batch_queue_depth",
            "Batch lines not yet answered, in running batches.",
            value=self.service.pending_lines(),
        )
        yield GaugeMetricFamily(
            "dmr_batches_active", "Batches not yet finished.", value=self.service.active()
        )
        done = CounterMetricFamily(
            "dmr_batch_requests", "Batch lines answered, by outcome.", labels=("outcome",)
        )
        for outcome in ("completed", "failed"):
            done.add_metric([outcome], self.service.counters[outcome])
        yield done
        yield CounterMetricFamily(
            "dmr_batch_retries",
            "Batch lines sent again after a 503 (a full queue).",
            value=self.service.counters["retried"],
        )


def _is_file_upload(method: str, path: str) -> bool:
    return method == "POST" and path in {prefix + "/files" for prefix in _PREFIXES}


@hookimpl
def dmr_api_dialects() -> list[ApiDialect]:
    return [ApiDialect(name="batch", blueprint=blueprint)]


@hookimpl
def dmr_server_startup(app: Quart) -> None:
    services = services_for(app)
    root = services.settings.models_path / "batch"
    files = FileStore(root / "files")
    service = BatchService(
        root / "batches", files, app, BatchSettings.from_env(), services.settings.api_key
    )
    services.extras[_SERVICE] = service
    # Uploads are limited by DMR_FILES_MAX_BYTES, not the app's request-body cap.
    lift_body_limit(app, "batch_files", _is_file_upload)
    register_collector(app, _BatchMetrics(service))
    service.start()


@hookimpl
async def dmr_server_shutdown(app: Quart) -> None:
    service = services_for(app).extras.get(_SERVICE)
    if isinstance(service, BatchService):
        await service.aclose()
