"""Model names as clients send them, resolved through the store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmr.server.model_names import resolve_model as resolve_in_store
from dmr.server.services import get_services

if TYPE_CHECKING:
    from dmr.store import StoredModel

__all__ = ["display_name", "resolve_model"]


def resolve_model(name: str) -> tuple[str, StoredModel]:
    """(the name to hand the scheduler, the stored model) for a client's model name
    (see `dmr.server.model_names.resolve_model`)."""
    return resolve_in_store(get_services().store, name)


def display_name(model: StoredModel) -> str:
    return model.tags[0] if model.tags else model.id
