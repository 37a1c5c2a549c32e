"""Models in OCI registries (built-in plugin): pull and push DMR artifacts.

The artifact format: docs/compatibility.md §2.

The transfers are blocking (requests, through oras) and run in worker threads;
layers download in parallel, each blob hashed as it is written (never read back).
Progress crosses back to the event loop in batches (`progress.LoopEmitter`), and a
cancelled pull stops its threads at the next chunk, leaving each partial blob as
`<hex>.incomplete` for the next pull to resume.

This module is registered at server start, so the registry client (oras, requests,
jsonschema: about 10 MB resident) and the progress helpers are imported by the
first pull or push, not here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dmr import media_types
from dmr.distribution.credentials import resolve_credentials
from dmr.distribution.gguf import GGUFError, read_gguf
from dmr.distribution.threaded_puller import ThreadedPuller
from dmr.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    RegistryError,
    UnsupportedMediaTypeError,
)
from dmr.hookspecs import hookimpl
from dmr.media_types import KNOWN_CONFIG_MEDIA_TYPES, MANIFEST_MAX_BYTES
from dmr.records import ModelSource, ProgressCallback
from dmr.reference import DOCKER_HUB_ALIASES, ModelReference, is_model_id, parse_reference
from dmr.settings import Settings
from dmr.store.artifact import layers_of, normalise_config, parse_manifest
from dmr.store.blobs import ensure_free_space
from dmr.store.bundle import bundle_file_names
from dmr.store.model_store import BlobMissingError
from dmr.store.models import parse_created

if TYPE_CHECKING:
    from dmr.distribution.progress import TransferProgress
    from dmr.distribution.registry_client import RegistryClient
    from dmr.store import Store

__all__ = [
    "OCI_SOURCE",
    "Descriptor",
    "dmr_model_sources",
    "inspect_remote_blocking",
    "push_to_registry",
    "registry_endpoints",
]

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
DOCKER_HUB_API_HOST = "registry-1.docker.io"
PARALLEL_LAYERS = 4
MAX_LAYERS = 1024
MAX_CONFIG_BYTES = MANIFEST_MAX_BYTES
MAX_LAYER_BYTES = 2 << 40  # 2 TiB: larger than any model, small enough to catch nonsense
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "[::1]"})


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class Endpoint:
    """Where to send requests for one registry: host[:port] and scheme."""

    host: str
    scheme: str
    credentials_host: str  # the name credentials are stored under


# --------------------------------------------------------------------------- endpoints


def _scheme_for(host: str) -> str:
    # A registry on this machine (a local test or cache registry) speaks plain HTTP;
    # any other starts with TLS (INSECURE_REGISTRY then allows a fallback to HTTP).
    hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    return "http" if hostname in _LOOPBACK else "https"


def _api_host(registry: str) -> str:
    return DOCKER_HUB_API_HOST if registry in DOCKER_HUB_ALIASES else registry


def _mirror_endpoint(text: str) -> Endpoint:
    scheme = None
    if "://" in text:
        scheme, _, text = text.partition("://")
    host = text.strip("/").split("/", 1)[0]
    return Endpoint(host=host, scheme=scheme or _scheme_for(host), credentials_host=host)


def registry_endpoints(reference: ModelReference, settings: Settings) -> list[Endpoint]:
    """Mirrors first (Docker Hub references only, as DMR does), then the registry itself."""
    endpoints: list[Endpoint] = []
    if reference.registry in DOCKER_HUB_ALIASES:
        endpoints.extend(_mirror_endpoint(m) for m in settings.registry_mirrors)
    host = _api_host(reference.registry)
    endpoints.append(
        Endpoint(host=host, scheme=_scheme_for(host), credentials_host=reference.registry)
    )
    return endpoints


def _client(
    endpoint: Endpoint, settings: Settings, bearer_token: str | None, stop: threading.Event
) -> RegistryClient:
    from dmr.distribution.registry_client import RegistryClient

    credentials = resolve_credentials(endpoint.credentials_host, bearer_token=bearer_token)
    return RegistryClient(
        endpoint.host,
        scheme=endpoint.scheme,
        credentials=credentials,
        stop=stop,
        http_fallback=settings.insecure_registry,
    )


# --------------------------------------------------------------------------- manifests


def _descriptor(raw: Any, where: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise RegistryError(f"{where} is not a descriptor")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise RegistryError(f"{where} has no media type")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise RegistryError(f"{where} has an invalid digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_LAYER_BYTES:
        raise RegistryError(f"{where} has an invalid size {size!r}")
    return Descriptor(media_type=media_type, digest=digest, size=size)


def parse_model_manifest(body: bytes) -> tuple[Descriptor, list[Descriptor]]:
    """Config and layers of a model manifest; unknown config types are refused here,
    before any blob is fetched."""
    try:
        manifest = json.loads(body)
    except ValueError as error:
        raise RegistryError(f"the registry sent a manifest that is not JSON: {error}") from error
    if not isinstance(manifest, dict):
        raise RegistryError("the registry sent a manifest that is not a JSON object")
    media_type = manifest.get("mediaType", OCI_MANIFEST)
    if media_type not in MANIFEST_MEDIA_TYPES:
        raise UnsupportedMediaTypeError(
            f"unsupported manifest media type {media_type!r}: not a model artifact"
        )
    config = _descriptor(manifest.get("config"), "the manifest's config")
    if config.media_type not in KNOWN_CONFIG_MEDIA_TYPES:
        raise UnsupportedMediaTypeError(
            f"unsupported config media type {config.media_type!r}: dmr reads "
            + ", ".join(sorted(KNOWN_CONFIG_MEDIA_TYPES))
        )
    if config.size > MAX_CONFIG_BYTES:
        raise RegistryError(f"model config of {config.size} bytes is too large")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise RegistryError("the manifest has no layers")
    if len(raw_layers) > MAX_LAYERS:
        raise RegistryError(f"the manifest has {len(raw_layers)} layers (at most {MAX_LAYERS})")
    layers = [_descriptor(raw, f"layer {n}") for n, raw in enumerate(raw_layers)]
    return config, layers


# --------------------------------------------------------------------------- pull


def _pull_blocking(
    name: str,
    store: Store,
    emit: ProgressCallback,
    bearer_token: str | None,
    stop: threading.Event,
) -> str:
    reference = parse_reference(name)
    client, body = _fetch_manifest(reference, bearer_token, stop)
    return _pull_from(client, reference, body, store, emit, stop)


def _fetch_manifest(
    reference: ModelReference, bearer_token: str | None, stop: threading.Event
) -> tuple[RegistryClient, bytes]:
    """The manifest from the first endpoint that has it (mirrors, then the registry)."""
    settings = Settings.from_env()
    manifest_ref = reference.digest or reference.tag
    failures: list[str] = []
    for endpoint in registry_endpoints(reference, settings):
        client = _client(endpoint, settings, bearer_token, stop)
        try:
            body, _digest = client.fetch_manifest(reference.repository, manifest_ref)
        except (RegistryError, ModelNotFoundError) as error:
            if endpoint.host == _api_host(reference.registry):
                raise
            failures.append(f"{endpoint.host}: {error.message}")
            log.info("mirror %s failed (%s); trying the next", endpoint.host, error.message)
            continue
        return client, body
    raise RegistryError("no registry could serve the model: " + "; ".join(failures))


def inspect_remote_blocking(
    reference: ModelReference, bearer_token: str | None = None
) -> dict[str, Any]:
    """The registry's copy of a model in `GET /models/{name}`'s shape, read from its
    manifest and config only: nothing is downloaded into the store."""
    client, body = _fetch_manifest(reference, bearer_token, threading.Event())
    config, layers = parse_model_manifest(body)
    config_bytes = client.fetch_small_blob(reference.repository, config.digest, config.size)
    normalised = normalise_config(config.media_type, config_bytes, layers_of(parse_manifest(body)))
    descriptor = normalised.get("descriptor")
    created = descriptor.get("created") if isinstance(descriptor, dict) else None
    return {
        "id": "sha256:" + hashlib.sha256(body).hexdigest(),
        "tags": [reference.familiar],
        "created": parse_created(created),
        "config": normalised.get("config") or {},
        "layers": [
            {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    }


def _pull_from(
    client: RegistryClient,
    reference: ModelReference,
    manifest: bytes,
    store: Store,
    emit: ProgressCallback,
    stop: threading.Event,
) -> str:
    from dmr.distribution.progress import TransferProgress

    config, layers = parse_model_manifest(manifest)
    # Where each layer would land in the bundle (no `..`, no absolute path): checked
    # now, as `add_model` will, so a hostile manifest costs no download.
    placed = bundle_file_names(layers_of(parse_manifest(manifest)))
    # GGUF weights by where they land: a CNCF ModelPack raw layer is one by its path.
    ggufs = {layer.digest for layer, name in placed if re.fullmatch(_GGUF_BUNDLE_NAME, name)}
    # The config is small: fetch and verify it in memory, and only store it once
    # every layer is in, so a failed pull adds nothing a model does not point to.
    config_bytes = client.fetch_small_blob(reference.repository, config.digest, config.size)
    total = sum(layer.size for layer in layers)
    tracker = TransferProgress(emit, mode="pull", total=total)
    # A concurrent delete of a model sharing a layer can remove a blob this pull
    # found present (or just wrote) before `add_model` records the new model:
    # download what went missing again rather than fail the pull.
    for attempt in range(_ADD_ATTEMPTS):
        try:
            _download_missing(client, reference, store, layers, tracker, stop)
            _check_weights(store, layers, ggufs)
            store.put_blob_bytes(config_bytes)
            # Pulled by digest (`repo@sha256:…`), as `docker pull` does: no tag.
            model = store.add_model(manifest, [] if reference.digest else [reference.familiar])
            break
        except BlobMissingError:
            if attempt + 1 == _ADD_ATTEMPTS:
                raise
            log.info("a blob of %s was deleted under the pull; fetching it again", reference)
    return str(model.id)


_ADD_ATTEMPTS = 3
_GGUF_MEDIA_TYPES = frozenset({media_types.GGUF, media_types.CNCF_GGUF})
# The bundle names GGUF weights get (dmr.store.bundle): model.gguf, model-0000N-of-0000M.gguf.
_GGUF_BUNDLE_NAME = r"model(-\d{5}-of-\d{5})?\.gguf"


def _check_weights(
    store: Store,
    layers: Sequence[Descriptor],
    gguf_digests: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Refuse GGUF weights whose header lies (counts, lengths, tensor offsets).

    A digest proves the bytes are the ones pushed, not that they are a model: a
    lying header would otherwise be found only when a runner tries to load it.
    The header is read with every length checked against the file's size, so no
    claim in it causes a large allocation.
    """
    for layer in layers:
        if layer.media_type not in _GGUF_MEDIA_TYPES and layer.digest not in gguf_digests:
            continue
        path = store.blob_path(layer.digest)
        try:
            read_gguf(path, max_array=0)
        except GGUFError as error:
            if not path.exists():
                # A delete of a model sharing the blob removed it just now: fetch it again.
                raise BlobMissingError(f"blob {layer.digest} was removed during the pull") from None
            store.remove_unused_blobs([layer.digest])
            reason = str(error).removeprefix(f"{path.name}: ")
            raise InvalidRequestError(
                f"the model's GGUF weights (layer {layer.digest[:19]}) are unusable: {reason}"
            ) from None


def _download_missing(
    client: RegistryClient,
    reference: ModelReference,
    store: Store,
    layers: Sequence[Descriptor],
    tracker: TransferProgress,
    stop: threading.Event,
) -> None:
    from dmr.distribution.progress import transfer_pool

    missing = [layer for layer in _unique(layers) if not store.has_blob(layer.digest)]
    ensure_free_space(store.layout, sum(_still_needed(store, layer) for layer in missing))
    for layer in layers:
        if layer not in missing:
            tracker.update(layer.digest, layer.size, layer.size)

    def fetch(layer: Descriptor) -> None:
        with store.blob_writer(layer.digest, layer.size) as writer:
            client.download_blob(
                reference.repository,
                layer.digest,
                layer.size,
                writer,
                lambda done: tracker.update(layer.digest, layer.size, done),
            )

    if missing:
        with transfer_pool(min(PARALLEL_LAYERS, len(missing))) as pool:
            futures = [pool.submit(fetch, layer) for layer in missing]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                stop.set()  # the others stop at their next chunk; partial files stay
                raise


def _still_needed(store: Store, layer: Descriptor) -> int:
    """Bytes of `layer` the disk must still find room for. A partial download counts
    as there, and so does what its file still has reserved past its end (a pull that
    was killed before it could give that back: `dmr.store.reserve`)."""
    partial = store.layout.incomplete_blob(layer.digest)
    if not partial.exists():
        return layer.size
    held = partial.stat()
    return max(layer.size - max(held.st_size, held.st_blocks * 512), 0)


def _unique(layers: Sequence[Descriptor]) -> list[Descriptor]:
    return list({layer.digest: layer for layer in layers}.values())


# --------------------------------------------------------------------------- push


def _push_blocking(
    reference: ModelReference,
    manifest: bytes,
    store: Store,
    emit: ProgressCallback,
    bearer_token: str | None,
    stop: threading.Event,
) -> None:
    from dmr.distribution.progress import TransferProgress, transfer_pool

    if reference.digest:
        raise InvalidRequestError(f"cannot push to a digest reference {reference.familiar!r}")
    config, layers = parse_model_manifest(manifest)
    settings = Settings.from_env()
    endpoint = registry_endpoints(reference, settings)[-1]  # never push to a mirror
    client = _client(endpoint, settings, bearer_token, stop)
    blobs = _unique([*layers, config])
    tracker = TransferProgress(emit, mode="push", total=sum(b.size for b in blobs))

    def send(blob: Descriptor) -> None:
        if client.has_blob(reference.repository, blob.digest):
            tracker.update(blob.digest, blob.size, blob.size)
            return
        client.upload_blob(
            reference.repository,
            blob.digest,
            blob.size,
            store.blob_path(blob.digest),
            lambda done: tracker.update(blob.digest, blob.size, done),
        )

    # One blob first settles authentication (and its token) before going parallel.
    send(blobs[0])
    if len(blobs) > 1:
        with transfer_pool(min(PARALLEL_LAYERS, len(blobs) - 1)) as pool:
            futures = [pool.submit(send, blob) for blob in blobs[1:]]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                stop.set()  # the other uploads stop at their next chunk
                raise
    media_type = json.loads(manifest).get("mediaType") or OCI_MANIFEST
    client.put_manifest(reference.repository, reference.tag, manifest, media_type)


async def push_to_registry(
    store: Store,
    name: str,
    progress: ProgressCallback,
    *,
    bearer_token: str | None = None,
) -> None:
    """Push the stored model `name` to the registry its reference names."""
    from dmr.distribution.progress import loop_callback, run_transfer

    model = store.get(name)
    if is_model_id(name):  # an ID names no registry: push to the model's first tag
        if not model.tags:
            raise InvalidRequestError(f"model {name} has no tag naming a registry to push to")
        name = model.tags[0]
    reference = parse_reference(name)
    manifest = store.manifest_bytes(model.id)
    emit = loop_callback(progress)
    await run_transfer(
        lambda stop: _push_blocking(reference, manifest, store, emit, bearer_token, stop), emit
    )


OCI_SOURCE = ModelSource(name="oci", prefixes=(), puller=ThreadedPuller(_pull_blocking))


@hookimpl
def dmr_model_sources() -> Sequence[ModelSource]:
    return [OCI_SOURCE]
