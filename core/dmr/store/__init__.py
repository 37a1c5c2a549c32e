"""The local model store (docs/compatibility.md §3): blobs, manifests, `models.json`, bundles."""

from __future__ import annotations

from dmr.store.blobs import BlobWriter
from dmr.store.layout import StoreLayout
from dmr.store.model_store import Store, normalise_tag
from dmr.store.models import StoredModel

__all__ = ["BlobWriter", "Store", "StoreLayout", "StoredModel", "normalise_tag"]
