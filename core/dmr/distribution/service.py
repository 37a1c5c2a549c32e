"""Pull and push entry points the routes call (docs/architecture.md, Distribution)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

from dmr import plugins
from dmr.distribution.oci import push_to_registry
from dmr.errors import InvalidRequestError, ModelNotFoundError
from dmr.reference import InvalidReferenceError, parse_reference

if TYPE_CHECKING:
    from dmr.records import ModelSource, ProgressCallback
    from dmr.store import Store, StoredModel

__all__ = ["pull_model", "push_model", "source_for"]


def source_for(reference: str, pm: pluggy.PluginManager | None = None) -> ModelSource:
    """The source whose prefix matches the reference; the prefix-less one (OCI
    registries) otherwise. A prefix with a URL scheme (`s3://`) is matched against
    the reference as typed, since such a reference is no OCI name; the others
    against the normalised name (`hf.co/x` is `huggingface.co/x`)."""
    sources = plugins.model_sources(pm)
    for source in sources:
        if any("://" in p and reference.startswith(p) for p in source.prefixes):
            return source
    try:
        full = parse_reference(reference).full
    except InvalidReferenceError as error:
        raise InvalidRequestError(str(error)) from error
    fallback: ModelSource | None = None
    for source in sources:
        if not source.prefixes:
            fallback = fallback or source
        elif any(full.startswith(prefix) for prefix in source.prefixes):
            return source
    if fallback is None:
        raise InvalidRequestError(f"no model source can pull {reference!r}")
    return fallback


async def pull_model(
    store: Store,
    reference: str,
    progress: ProgressCallback,
    *,
    bearer_token: str | None = None,
    pm: pluggy.PluginManager | None = None,
) -> StoredModel:
    """Pull `reference` into `store`, reporting `ProgressEvent`s, and return the model."""
    source = source_for(reference, pm)
    for attempt in range(_PULL_ATTEMPTS):
        model_id = await source.puller.pull(reference, store, progress, bearer_token=bearer_token)
        try:
            return store.get(model_id)
        except ModelNotFoundError:
            # A delete racing this pull removed the model just after it was added:
            # pull again (its blobs are mostly still there) rather than fail the pull.
            if attempt + 1 == _PULL_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


_PULL_ATTEMPTS = 3


async def push_model(
    store: Store,
    name: str,
    progress: ProgressCallback,
    *,
    bearer_token: str | None = None,
) -> None:
    """Push the stored model `name` to the registry its reference names."""
    try:
        reference = parse_reference(name)
    except InvalidReferenceError:
        reference = None  # a model ID: the OCI push resolves it to a tag
    if reference is not None and reference.is_huggingface:
        raise InvalidRequestError("pushing to Hugging Face is not supported")
    await push_to_registry(store, name, progress, bearer_token=bearer_token)
