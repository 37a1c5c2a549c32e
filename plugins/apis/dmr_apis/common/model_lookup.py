"""Model and backend names as clients send them, resolved through the store and the
installed engines."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmr.sdk import ModelNotFoundError
from dmr.sdk.dialect import get_services
from dmr.sdk.dialect import resolve_model as resolve_in_store

if TYPE_CHECKING:
    from dmr.sdk import StoredModel

__all__ = ["check_backend", "display_name", "resolve_model"]


def resolve_model(name: str) -> tuple[str, StoredModel]:
    """(the name to hand the scheduler, the stored model) for a client's model name
    (see `dmr.server.model_names.resolve_model`)."""
    return resolve_in_store(get_services().store, name)


def display_name(model: StoredModel) -> str:
    return model.tags[0] if model.tags else model.id


def check_backend(backend: str | None) -> None:
    """A backend named in the path (`/engines/{backend}/...`) must be an installed engine."""
    if backend is not None and backend not in get_services().engines:
        known = ", ".join(sorted(get_services().engines)) or "none"
        raise ModelNotFoundError(f"unknown backend {backend!r} (installed: {known})")
