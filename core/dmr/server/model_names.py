"""Model names as clients send them, resolved through the store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmr.errors import ModelNotFoundError
from dmr.reference import InvalidReferenceError, parse_reference

if TYPE_CHECKING:
    from dmr.store import Store, StoredModel

__all__ = ["resolve_model"]


def resolve_model(store: Store, name: str) -> tuple[str, StoredModel]:
    """(the name to hand the scheduler, the stored model) for a client's model name.

    The store resolves tags, bare names and IDs; Ollama clients also send
    `smollm2:latest`, which only its normalised form (`ai/smollm2:latest`) finds.
    """
    try:
        return name, store.get(name)
    except ModelNotFoundError:
        pass
    try:
        familiar = parse_reference(name).familiar
    except (InvalidReferenceError, ValueError):
        raise ModelNotFoundError(f"model {name!r} not found") from None
    if familiar != name:
        try:
            return familiar, store.get(familiar)
        except ModelNotFoundError:
            pass
    raise ModelNotFoundError(f"model {name!r} not found")
