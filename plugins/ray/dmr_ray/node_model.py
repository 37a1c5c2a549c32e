"""A model on a node: pulled into the node's own store by digest, or read from a
shared store, and never served before every blob matched its digest."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dmr.sdk import DmrError, ModelNotFoundError, ProgressEvent, Store, StoredModel
from dmr.sdk.cluster import hash_file, pull_model

__all__ = ["DigestMismatchError", "ensure_model", "node_store_root", "pinned_reference"]

log = logging.getLogger(__name__)


class DigestMismatchError(DmrError):
    """A blob on the node is not what its digest says."""

    status = 502
    code = "digest_mismatch"


def node_store_root() -> Path:
    """Where this node keeps the models it serves (`DMR_RAY_NODE_STORE`, set in the
    environment `ray start` runs in)."""
    configured = os.environ.get("DMR_RAY_NODE_STORE", "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "dmr" / "ray-node-store"


def pinned_reference(tag: str, model_id: str) -> str | None:
    """`registry/repo@sha256:...` for a tag such as `registry/repo:latest`: the same
    manifest whatever the tag points at now. None for a model ID."""
    if tag.startswith("sha256:"):
        return None
    repository = tag.split("@", 1)[0]
    last_colon, last_slash = repository.rfind(":"), repository.rfind("/")
    if last_colon > last_slash:
        repository = repository[:last_colon]
    return f"{repository}@{model_id}"


def mismatched_blobs(store: Store, stored: StoredModel) -> list[str]:
    """The digests (config and layers) whose blob is missing or hashes otherwise."""
    config = stored.manifest.get("config", {})
    digests = [str(config.get("digest", "")), *stored.files]
    bad = []
    for digest in filter(None, digests):
        path = store.blob_path(digest)
        if not path.is_file() or hash_file(path)[0] != digest:
            bad.append(digest)
    return bad


async def ensure_model(
    model_id: str, tags: list[str], *, node: str, shared_root: str | None
) -> StoredModel:
    """The verified model `model_id` on this node: from the shared store when there
    is one, else from the node's store, pulled (again) from a registry when missing
    or when a blob does not match its digest."""
    if shared_root is not None:
        store = Store.open(Path(shared_root))
        try:
            stored = store.get(model_id)
        except ModelNotFoundError as error:
            raise DmrError(
                f"node {node} sees no {model_id} in the shared store {shared_root}"
            ) from error
        _refuse_mismatch(store, stored, node, "the shared store")
        return stored
    store = Store.open(node_store_root())
    found = store.find(model_id)
    if found is not None:
        bad = mismatched_blobs(store, found)
        if not bad:
            return found
        log.warning("%s failed its digest check on node %s; pulling it again", model_id, node)
        _discard(store, set(bad))
    return await _pull_verified(store, model_id, tags, node)


async def _pull_verified(store: Store, model_id: str, tags: list[str], node: str) -> StoredModel:
    """Pull, then check every blob; a pull keeps the blobs the node already has, so
    bad ones (of this model or another sharing a layer) are dropped and the pull
    is made once more before the node refuses the model."""
    for attempt in range(2):
        try:
            stored = await _pull(store, model_id, tags, node)
        except DmrError:
            bad = {
                digest for model in store.list_models() for digest in mismatched_blobs(store, model)
            }
            if attempt or not bad:
                raise
            log.warning("blobs on node %s failed their digest check; pulling them again", node)
            _discard(store, bad)
            continue
        if attempt == 0 and (bad_blobs := mismatched_blobs(store, stored)):
            log.warning("%s failed its digest check on node %s; pulling it again", model_id, node)
            _discard(store, set(bad_blobs))
            continue
        _refuse_mismatch(store, stored, node, "the registry")
        return stored
    raise AssertionError("unreachable")


def _discard(store: Store, bad: set[str]) -> None:
    """Forget every model on the node that uses a bad blob (their bundles hard-link
    it), then the blobs themselves: the next pull fetches them again."""
    for model in store.list_models():
        config = str(model.manifest.get("config", {}).get("digest", ""))
        if bad & {config, *model.files}:
            store.delete(model.id, force=True)
    for digest in bad:
        store.blob_path(digest).unlink(missing_ok=True)


def _refuse_mismatch(store: Store, stored: StoredModel, node: str, source: str) -> None:
    bad = mismatched_blobs(store, stored)
    if bad:
        raise DigestMismatchError(
            f"node {node} refuses {stored.name} ({stored.id}): blob {bad[0]} from {source}"
            f" does not match its digest ({len(bad)} of {len(stored.files) + 1} blobs)"
        )


async def _pull(store: Store, model_id: str, tags: list[str], node: str) -> StoredModel:
    def quiet(event: ProgressEvent) -> None:
        pass

    tried: list[str] = []
    for tag in tags:
        reference = pinned_reference(tag, model_id)
        if reference is None:
            continue
        try:
            await pull_model(store, reference, quiet)
            return store.get(model_id)
        except (DmrError, OSError) as error:
            message = error.message if isinstance(error, DmrError) else str(error)
            tried.append(f"{reference}: {message}")
    detail = "; ".join(tried) if tried else "it has no registry tag"
    raise DmrError(
        f"node {node} cannot get {tags[0] if tags else model_id} ({model_id}): {detail}."
        " Push it to a registry the nodes reach, or put the store on shared storage"
        " (DMR_RAY_SHARED_STORE=1, docs/cluster.md)"
    )
