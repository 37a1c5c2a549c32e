"""Ollama's prompt truncation, for requests that ask for it (`"truncate": true`).

The Ollama dialect asks for it (docs/apis.md): Ollama answers a prompt longer
than the context instead of refusing it, and clients such as Open WebUI rely on
that. It is done here because the runner has the chat template, the tokenizer
and the slot's context at hand. Two steps, as Ollama's server and runner do
them (ollama server/prompt.go `chatPrompt`, llm/llama_server.go):

1. Messages: when the rendered chat does not fit the slot, the oldest messages
   are dropped until it fits the limit below. System messages are always kept,
   and so is the newest message.
2. Tokens: a prompt still too long keeps its first `n_keep` tokens (Ollama's
   `num_keep`, 4, after BOS) and its newest tokens up to the limit.

The limit is Ollama's after its first context shift: `n_keep` plus half of the
rest of the context, so the other half is left for the answer.

Each truncation is logged (the runner's log, shown by `dmr logs`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_N_KEEP", "fit_messages", "fit_tokens", "prompt_limit", "wants_truncation"]

log = logging.getLogger(__name__)

DEFAULT_N_KEEP = 4  # Ollama's default `num_keep`


@dataclass(frozen=True)
class Truncation:
    """What a request asked for: whether to truncate, and the tokens to keep first."""

    n_keep: int


def wants_truncation(body: dict[str, Any]) -> Truncation | None:
    """The request's truncation, or None when it wants the context-size error."""
    if body.get("truncate") is not True:
        return None
    n_keep = body.get("n_keep")
    if not isinstance(n_keep, int) or isinstance(n_keep, bool) or n_keep < 0:
        n_keep = DEFAULT_N_KEEP
    return Truncation(n_keep=n_keep)


def prompt_limit(context: int, n_keep: int) -> int:
    """Ollama's `contextShiftPromptLimit`: the prompt size that leaves room to answer."""
    if context <= 1:
        return 0
    n_keep = max(0, min(n_keep, context - 1))
    return context - max((context - n_keep) // 2, 1)


def fit_messages(
    messages: list[dict[str, Any]],
    render: Callable[[list[dict[str, Any]]], str],
    count: Callable[[str], int],
    *,
    context: int,
    n_keep: int,
) -> str:
    """The prompt of `messages`, with the oldest dropped when it does not fit `context`."""
    whole = render(messages)
    total = count(whole)
    if total < context or len(messages) < 2:
        return whole
    limit = prompt_limit(context, n_keep)
    last = len(messages) - 1

    def candidate(first: int) -> list[dict[str, Any]]:
        kept_system = [m for m in messages[:first] if m.get("role") == "system"]
        return kept_system + messages[first:]

    # The smallest `first` whose prompt fits (fewer messages, fewer tokens), else
    # the newest message alone with the system prompts; searched by halving.
    low, high = 1, last
    best: tuple[int, str, int] | None = None
    while low <= high:
        middle = (low + high) // 2
        prompt = render(candidate(middle))
        tokens = count(prompt)
        if tokens <= limit:
            best = (middle, prompt, tokens)
            high = middle - 1
        else:
            low = middle + 1
    if best is None:
        prompt = render(candidate(last))
        best = (last, prompt, count(prompt))
    first, prompt, tokens = best
    dropped = sum(1 for m in messages[:first] if m.get("role") != "system")
    log.info(
        "truncating input messages which exceed the context: %d of %d messages dropped, "
        "prompt %d -> %d tokens (context %d, limit %d)",
        dropped,
        len(messages),
        total,
        tokens,
        context,
        limit,
    )
    return prompt


def fit_tokens(tokens: list[int], *, context: int, n_keep: int, adds_bos: bool) -> list[int]:
    """`tokens` cut to the limit when they do not fit `context`: the first `n_keep`
    (after BOS) and the newest."""
    if len(tokens) < context:
        return tokens
    keep = min(n_keep + (1 if adds_bos else 0), context - 1)
    limit = prompt_limit(context, keep)
    kept = tokens[:keep] + tokens[len(tokens) - (limit - keep) :]
    log.warning(
        "truncating input prompt: %d tokens -> %d (context %d, keep %d)",
        len(tokens),
        len(kept),
        context,
        keep,
    )
    return kept
