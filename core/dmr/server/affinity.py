"""A request's prompt prefix, so that a model's replicas each keep their own
conversations (and the prompt caches that hold them): `Scheduler.acquire(affinity=)`."""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["prompt_prefix"]

# Characters of a plain prompt that name its conversation.
PREFIX_CHARS = 512


def prompt_prefix(body: bytes) -> str | None:
    """A short digest of what a conversation's requests share: the first two messages
    of a chat (the system prompt and the first question), or the start of a prompt.
    None when the body has neither (it then goes to the least busy replica)."""
    try:
        request = json.loads(body)
    except ValueError:
        return None
    if not isinstance(request, dict):
        return None
    shared: Any = None
    messages = request.get("messages")
    if isinstance(messages, list) and messages:
        shared = messages[:2]
    else:
        for key in ("prompt", "input"):
            value = request.get(key)
            if isinstance(value, str) and value:
                shared = value[:PREFIX_CHARS]
                break
            if isinstance(value, list) and value:
                shared = value[:2]
                break
    if shared is None:
        return None
    text = json.dumps(shared, sort_keys=True, default=str)[: PREFIX_CHARS * 4]
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
