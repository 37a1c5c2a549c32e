"""Embeddings, rerank and score: the routes of a runner in embedding or reranking mode."""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio
from dmr.sdk.runner import BadRequest, json_response
from quart import Blueprint, Response

from dmr_llamacpp.runner.state import RunnerState, request_body, runner_state

__all__ = ["blueprint"]

blueprint = Blueprint("dmr_llamacpp_pooling", __name__)


@blueprint.post("/v1/embeddings")
@blueprint.post("/embeddings")
async def embeddings() -> Response:
    state = runner_state()
    body = await request_body()
    raw = body.get("input")
    if isinstance(raw, str):
        inputs: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        inputs = raw
    elif isinstance(raw, list) and raw and all(isinstance(item, int) for item in raw):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(item, list) for item in raw):
        inputs = raw
    else:
        raise BadRequest("'input' must be a string, a list of strings or token lists", "input")
    model = state.require_model()
    pooler = state.require_pooler()
    token_lists = [
        item if isinstance(item, list) else model.tokenize(item, add_special=True)
        for item in inputs
    ]
    try:
        vectors = await anyio.to_thread.run_sync(pooler.embed, token_lists)
    except ValueError as error:
        raise BadRequest(str(error), "input") from None
    total = sum(len(tokens) for tokens in token_lists)
    data = [
        {"object": "embedding", "index": index, "embedding": vector.tolist()}
        for index, vector in enumerate(vectors)
    ]
    return _list_answer(state, total, data=data)


@blueprint.post("/v1/rerank")
@blueprint.post("/rerank")
async def rerank() -> Response:
    state = runner_state()
    body = await request_body()
    query, documents = _string(body, "query"), body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise BadRequest("'documents' must be a non-empty list", "documents")
    texts = [doc if isinstance(doc, str) else (doc or {}).get("text") for doc in documents]
    if not all(isinstance(text, str) for text in texts):
        raise BadRequest("each document must be a string or {'text': ...}", "documents")
    scores, tokens = await _scores(state, query, [str(text) for text in texts])
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    top_n = body.get("top_n")
    if isinstance(top_n, int) and top_n > 0:
        order = order[:top_n]
    results = []
    for index in order:
        item: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
        if body.get("return_documents"):
            item["document"] = {"text": texts[index]}
        results.append(item)
    return _list_answer(state, tokens, results=results)


@blueprint.post("/v1/score")
@blueprint.post("/score")
async def score() -> Response:
    state = runner_state()
    body = await request_body()
    first, second = _string(body, "text_1"), body.get("text_2")
    seconds = [second] if isinstance(second, str) else second
    if not isinstance(seconds, list) or not seconds or not all(isinstance(s, str) for s in seconds):
        raise BadRequest("'text_2' must be a string or a non-empty list of strings", "text_2")
    scores, tokens = await _scores(state, first, seconds)
    return _list_answer(
        state,
        tokens,
        id=f"score-{uuid.uuid4().hex}",
        created=int(time.time()),
        data=[{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
    )


def _list_answer(state: RunnerState, tokens: int, **fields: Any) -> Response:
    """A `list` object of the three routes: `fields`, and the tokens read as usage."""
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return json_response({"object": "list", "model": state.model_name, **fields, "usage": usage})


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string", key)
    return value


def _pair(state: RunnerState, query: str, document: str) -> list[int]:
    model = state.require_model()
    tokens = model.tokenize(query, add_special=True)
    separator = model.sep_token if model.sep_token >= 0 else model.eos_token
    return [*tokens, separator, *model.tokenize(document, add_special=False)]


async def _scores(state: RunnerState, query: str, documents: list[str]) -> tuple[list[float], int]:
    """How well each document answers `query`, and how many tokens the pairs took."""
    pairs = [_pair(state, query, document) for document in documents]
    pooler = state.require_pooler()
    try:
        if pooler.rank_head:
            scores = await anyio.to_thread.run_sync(pooler.rank, pairs)
        else:
            # No classification head: cosine similarity of pooled embeddings.
            model = state.require_model()
            vectors = await anyio.to_thread.run_sync(
                pooler.embed,
                [model.tokenize(query, add_special=True)]
                + [model.tokenize(document, add_special=True) for document in documents],
            )
            scores = [float(vectors[0] @ vector) for vector in vectors[1:]]
    except ValueError as error:
        raise BadRequest(str(error)) from None
    return scores, sum(len(pair) for pair in pairs)
