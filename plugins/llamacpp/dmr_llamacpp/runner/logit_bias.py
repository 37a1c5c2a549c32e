"""OpenAI's `logit_bias`, read as llama-server reads it (tools/server/server-schema.cpp).

- an object of token ids, as strings (OpenAI's form), or of texts, each to a bias;
- or a list of `[token id or text, bias]` pairs (llama-server's form).

A bias is a number added to the token's logit before sampling (-100 all but bans
it, as at OpenAI), or `false`: never sampled. A text's bias goes to each token the
text tokenizes to, without special tokens. Where llama-server skips an entry it
cannot read or a token id outside the vocabulary, dmr answers 400 naming it, so
that a misspelt bias is never silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from dmr.sdk.runner import BadRequest

__all__ = ["BiasPairs", "parse_logit_bias", "token_biases"]

# (token id or text, bias); after `token_biases`, token ids only.
BiasPairs = tuple[tuple[int | str, float], ...]

FIELD = "logit_bias"


def _bias(value: Any, key: object) -> float:
    if value is False:
        return -math.inf
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise BadRequest(f"'{FIELD}' for {key!r} must be a number or false", FIELD)
    return float(value)


def _key(raw: object) -> int | str:
    """A token id (an int, or a string of digits as OpenAI sends ids) or a text."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw:
        stripped = raw.strip()
        if stripped.lstrip("-").isdigit():
            return int(stripped)
        return raw
    raise BadRequest(f"'{FIELD}' keys must be token ids or non-empty texts, not {raw!r}", FIELD)


def parse_logit_bias(body: dict[str, Any]) -> BiasPairs:
    """The body's `logit_bias` as pairs, in the order given; () when absent."""
    raw = body.get(FIELD)
    if raw is None:
        return ()
    if isinstance(raw, dict):
        return tuple((_key(key), _bias(value, key)) for key, value in raw.items())
    if isinstance(raw, list):
        pairs: list[tuple[int | str, float]] = []
        for item in raw:
            if not isinstance(item, list) or len(item) != 2:
                raise BadRequest(f"'{FIELD}' as a list holds [token, bias] pairs", FIELD)
            pairs.append((_key(item[0]), _bias(item[1], item[0])))
        return tuple(pairs)
    raise BadRequest(f"'{FIELD}' must be an object or a list of [token, bias] pairs", FIELD)


def token_biases(pairs: BiasPairs, tokenize: Callable[[str], list[int]], n_vocab: int) -> BiasPairs:
    """`pairs` with each text replaced by its tokens; a token id outside the
    vocabulary, or a text of no tokens, is a 400."""
    biases: list[tuple[int | str, float]] = []
    for key, bias in pairs:
        if isinstance(key, int):
            if not 0 <= key < n_vocab:
                raise BadRequest(
                    f"'{FIELD}' names token {key}; this model's tokens are 0 to {n_vocab - 1}",
                    FIELD,
                )
            biases.append((key, bias))
            continue
        tokens = tokenize(key)
        if not tokens:
            raise BadRequest(f"'{FIELD}' text {key!r} is no token", FIELD)
        biases.extend((token, bias) for token in tokens)
    return tuple(biases)
