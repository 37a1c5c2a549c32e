"""The runner's HTTP routes (Runner protocol, docs/architecture.md) on a Quart app."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from dmr.runner_support import BadRequest, error_response, json_response
from quart import Quart, Response, request

from dmr_llamacpp.runner.batching import (
    BatchedGenerator,
    Failed,
    Finished,
    GenerationJob,
    TextDelta,
    TokenLogprob,
)
from dmr_llamacpp.runner.chat import ChatTemplate, parse_tool_output
from dmr_llamacpp.runner.metrics import render_metrics
from dmr_llamacpp.runner.model import LoadedModel
from dmr_llamacpp.runner.pooling import Pooler
from dmr_llamacpp.runner.requests import normalise_messages, sampling_from_body
from dmr_llamacpp.runner.streaming import StreamingRoutes
from dmr_llamacpp.settings import WorkerSettings

__all__ = ["RunnerState", "create_app", "create_asgi"]


@dataclass
class RunnerState:
    """What the routes need once the model is loaded (None while loading)."""

    model_name: str
    mode: str
    settings: WorkerSettings
    model: LoadedModel | None = None
    generator: BatchedGenerator | None = None
    pooler: Pooler | None = None
    template: ChatTemplate | None = None
    created: int = 0
    load_error: str | None = None


def _logprobs_chat(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": entry.token,
                "logprob": entry.logprob,
                "bytes": entry.bytes,
                "top_logprobs": [
                    {"token": token, "logprob": logprob, "bytes": data}
                    for token, logprob, data in entry.top
                ],
            }
            for entry in entries
        ]
    }


def _logprobs_completion(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [{token: logprob for token, logprob, _ in entry.top} for entry in entries],
        "text_offset": offsets,
    }


def _timings(done: Finished) -> dict[str, float]:
    """llama-server's `timings`: `prompt_n` counts the prompt tokens decoded, `cache_n`
    those reused from the slot's cache."""
    decoded = done.prompt_tokens - done.cached_tokens
    return {
        "cache_n": done.cached_tokens,
        "prompt_n": decoded,
        "prompt_ms": done.prompt_ms,
        "prompt_per_token_ms": done.prompt_ms / max(1, decoded),
        "prompt_per_second": decoded / (done.prompt_ms / 1000) if done.prompt_ms else 0.0,
        "predicted_n": done.completion_tokens,
        "predicted_ms": done.predicted_ms,
        "predicted_per_token_ms": done.predicted_ms / max(1, done.completion_tokens),
        "predicted_per_second": (
            done.completion_tokens / (done.predicted_ms / 1000) if done.predicted_ms else 0.0
        ),
    }


def _usage(done: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


@dataclass(frozen=True)
class _Collected:
    """A whole (non-streamed) answer: its text, logprobs and how it ended."""

    text: str
    logprobs: list[TokenLogprob]
    done: Finished


async def _collect(job: GenerationJob) -> _Collected:
    """Run `job` to the end; RuntimeError when the decode loop failed it."""
    parts: list[str] = []
    entries: list[TokenLogprob] = []
    async for event in _events(job):
        if isinstance(event, TextDelta):
            parts.append(event.text)
            entries.extend(event.logprobs)
        else:
            return _Collected("".join(parts), entries, event)
    raise RuntimeError("generation ended without finishing")


def _sse_error(message: str) -> bytes:
    """The event that ends a stream whose generation failed (OpenAI's error shape)."""
    return _sse(
        {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    )


async def _events(job: GenerationJob) -> AsyncIterator[TextDelta | Finished]:
    """The job's events until it finishes; leaving early (disconnect) cancels its slot."""
    try:
        while True:
            event = await job.events.get()
            if isinstance(event, Failed):
                raise RuntimeError(event.message)
            yield event
            if isinstance(event, Finished):
                return
    finally:
        job.cancel()


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def content_chunk_encoder(chunk_base: dict[str, Any]) -> Callable[[str], bytes]:
    """`text -> SSE event` for the common chunk (content only, no logprobs): the JSON
    around the text is encoded once per stream, not once per token."""
    marker = f"dmr-content-{uuid.uuid4().hex}"
    template = _sse(
        {
            **chunk_base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": marker},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
    )
    head, tail = template.split(json.dumps(marker).encode(), 1)

    def encode(text: str) -> bytes:
        return head + json.dumps(text, ensure_ascii=False).encode() + tail

    return encode


GenerationAnswer = Response | AsyncIterator[bytes]


def create_app(state: RunnerState) -> Quart:
    app = Quart(__name__)
    # Quart cuts responses off after 60 s by default; a long generation is not an error.
    app.config["RESPONSE_TIMEOUT"] = None

    async def body_json() -> dict[str, Any]:
        return parse_body(await request.get_data())

    def loaded() -> LoadedModel:
        if state.model is None:
            raise BadRequest("the model is still loading")
        return state.model

    @app.errorhandler(BadRequest)
    async def bad_request(error: BadRequest) -> Response:
        return error_response(error.message, 400, param=error.param)

    @app.get("/health")
    async def health() -> Response:
        if state.load_error:
            return error_response(state.load_error, 500)
        if state.model is None:
            return error_response("loading model", 503)
        return json_response({"status": "ok"})

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> Response:
        meta: dict[str, Any] = {}
        if state.model is not None:
            meta = {
                "n_ctx_train": state.model.n_ctx_train,
                "n_embd": state.model.n_embd,
                "n_vocab": state.model.n_vocab,
            }
        return json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": state.model_name,
                        "object": "model",
                        "created": state.created,
                        "owned_by": "llamacpp",
                        "meta": meta,
                    }
                ],
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.generator is None:
            from dmr_llamacpp.runner.batching import GeneratorStats

            return Response(
                render_metrics(GeneratorStats), content_type="text/plain; version=0.0.4"
            )
        generator = state.generator
        return Response(
            render_metrics(lambda: generator.stats), content_type="text/plain; version=0.0.4"
        )

    @app.post("/tokenize")
    async def tokenize() -> Response:
        body = await body_json()
        content = body.get("content")
        if not isinstance(content, str):
            raise BadRequest("'content' must be a string", "content")
        tokens = loaded().tokenize(content, add_special=bool(body.get("add_special", False)))
        return json_response({"tokens": tokens})

    @app.post("/detokenize")
    async def detokenize() -> Response:
        body = await body_json()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise BadRequest("'tokens' must be a list of integers", "tokens")
        return json_response({"content": loaded().detokenize(tokens)})

    @app.post("/apply-template")
    async def apply_template() -> Response:
        body = await body_json()
        messages, _grammar, _tools = normalise_messages(body)
        return json_response({"prompt": render_prompt(messages, body)})

    def render_prompt(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
        assert state.template is not None or state.model is None
        if state.template is None:
            raise BadRequest("the model is still loading")
        try:
            return state.template.render(messages, tools=body.get("tools"))
        except ValueError as error:
            raise BadRequest(str(error), "messages") from None

    def generator() -> BatchedGenerator:
        if state.generator is None:
            if state.model is not None:
                raise BadRequest(f"this runner serves {state.mode}, not completions")
            raise BadRequest("the model is still loading")
        return state.generator

    async def start_job(prompt: str, params: Any) -> GenerationJob:
        model = loaded()
        tokens = model.tokenize(prompt, add_special=True, parse_special=True)
        if not tokens:
            tokens = [model.bos_token]
        job = GenerationJob(tokens, params)
        try:
            generator().submit(job)
        except ValueError as error:
            raise BadRequest(str(error)) from None
        return job

    def event_stream(chunks: AsyncIterator[bytes]) -> Response:
        return Response(
            chunks, content_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions() -> Response:
        answer = await chat_answer(await body_json())
        return answer if isinstance(answer, Response) else event_stream(answer)

    async def chat_answer(body: dict[str, Any]) -> GenerationAnswer:
        """The whole answer, or for `stream` its SSE events (see `StreamingRoutes`)."""
        messages, tool_grammar, with_tools = normalise_messages(body)
        params = sampling_from_body(body, state.settings, chat=True, grammar=tool_grammar)
        prompt = render_prompt(messages, body)
        job = await start_job(prompt, params)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        base = {
            "id": ident,
            "created": created,
            "model": state.model_name,
            "system_fingerprint": "dmr-llamacpp",
        }
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return _chat_stream(job, base, with_tools=with_tools, include_usage=include_usage)
        try:
            collected = await _collect(job)
        except RuntimeError as error:
            return error_response(str(error), 500)
        text, entries, done = collected.text, collected.logprobs, collected.done
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = done.reason
        if with_tools:
            content, calls = parse_tool_output(text)
            message["content"] = content
            if calls:
                message["tool_calls"] = [
                    {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
                    for call in calls
                ]
                finish = "tool_calls"
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "finish_reason": finish,
            "logprobs": _logprobs_chat(entries) if params.logprobs is not None else None,
        }
        return json_response(
            {
                **base,
                "object": "chat.completion",
                "choices": [choice],
                "usage": _usage(done),
                "timings": _timings(done),
                "stopping_word": done.stop_word or "",
            }
        )

    async def _chat_stream(
        job: GenerationJob, base: dict[str, Any], *, with_tools: bool, include_usage: bool
    ) -> AsyncIterator[bytes]:
        chunk_base = {**base, "object": "chat.completion.chunk"}
        content_chunk = content_chunk_encoder(chunk_base)

        def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
            return _sse(
                {
                    **chunk_base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": delta,
                            "logprobs": extra.pop("logprobs", None),
                            "finish_reason": finish,
                        }
                    ],
                    **extra,
                }
            )

        yield chunk({"role": "assistant", "content": ""}, None)
        held: list[str] = []
        try:
            async for event in _events(job):
                if isinstance(event, TextDelta):
                    if with_tools:
                        held.append(event.text)  # tool calls go out whole, at the end
                    elif job.params.logprobs is None:
                        if event.text:
                            yield content_chunk(event.text)
                    elif event.text or event.logprobs:
                        logprobs = _logprobs_chat(event.logprobs)
                        yield chunk({"content": event.text}, None, logprobs=logprobs)
                    continue
                finish = event.reason
                if with_tools:
                    content, calls = parse_tool_output("".join(held))
                    if calls:
                        finish = "tool_calls"
                        yield chunk(
                            {
                                "tool_calls": [
                                    {
                                        "index": i,
                                        "id": f"call_{uuid.uuid4().hex[:24]}",
                                        "type": "function",
                                        "function": call,
                                    }
                                    for i, call in enumerate(calls)
                                ]
                            },
                            None,
                        )
                    elif content:
                        yield chunk({"content": content}, None)
                yield chunk(
                    {}, finish, timings=_timings(event), stopping_word=event.stop_word or ""
                )
                if include_usage:
                    yield _sse({**chunk_base, "choices": [], "usage": _usage(event)})
        except RuntimeError as error:
            yield _sse_error(str(error))
        yield b"data: [DONE]\n\n"

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions() -> Response:
        answer = await completion_answer(await body_json())
        return answer if isinstance(answer, Response) else event_stream(answer)

    async def completion_answer(body: dict[str, Any]) -> GenerationAnswer:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string", "prompt")
        params = sampling_from_body(body, state.settings, chat=False)
        job = await start_job(prompt, params)
        base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": state.model_name,
            "system_fingerprint": "dmr-llamacpp",
        }
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return _completion_stream(job, base, include_usage)
        try:
            collected = await _collect(job)
        except RuntimeError as error:
            return error_response(str(error), 500)
        entries, done = collected.logprobs, collected.done
        choice = {
            "index": 0,
            "text": collected.text,
            "finish_reason": done.reason,
            "logprobs": _logprobs_completion(entries, 0) if params.logprobs is not None else None,
        }
        return json_response(
            {
                **base,
                "object": "text_completion",
                "choices": [choice],
                "usage": _usage(done),
                "timings": _timings(done),
                "stopping_word": done.stop_word or "",
            }
        )

    async def _completion_stream(
        job: GenerationJob, base: dict[str, Any], include_usage: bool
    ) -> AsyncIterator[bytes]:
        chunk_base = {**base, "object": "text_completion"}
        offset = 0
        try:
            async for event in _events(job):
                if isinstance(event, TextDelta):
                    logprobs = (
                        _logprobs_completion(event.logprobs, offset)
                        if job.params.logprobs is not None
                        else None
                    )
                    offset += len(event.text)
                    if event.text or event.logprobs:
                        yield _sse(
                            {
                                **chunk_base,
                                "choices": [
                                    {
                                        "index": 0,
                                        "text": event.text,
                                        "logprobs": logprobs,
                                        "finish_reason": None,
                                    }
                                ],
                            }
                        )
                    continue
                yield _sse(
                    {
                        **chunk_base,
                        "choices": [
                            {
                                "index": 0,
                                "text": "",
                                "logprobs": None,
                                "finish_reason": event.reason,
                            }
                        ],
                        "timings": _timings(event),
                        "stopping_word": event.stop_word or "",
                    }
                )
                if include_usage:
                    yield _sse({**chunk_base, "choices": [], "usage": _usage(event)})
        except RuntimeError as error:
            yield _sse_error(str(error))
        yield b"data: [DONE]\n\n"

    def pooler() -> Pooler:
        if state.pooler is None:
            if state.model is not None:
                raise BadRequest(
                    f"this runner serves {state.mode}; start it in embedding or reranking mode"
                )
            raise BadRequest("the model is still loading")
        return state.pooler

    @app.post("/v1/embeddings")
    @app.post("/embeddings")
    async def embeddings() -> Response:
        body = await body_json()
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
        model = loaded()
        pool = pooler()
        token_lists = [
            item if isinstance(item, list) else model.tokenize(item, add_special=True)
            for item in inputs
        ]
        try:
            vectors = await anyio.to_thread.run_sync(pool.embed, token_lists)
        except ValueError as error:
            raise BadRequest(str(error), "input") from None
        total = sum(len(tokens) for tokens in token_lists)
        return json_response(
            {
                "object": "list",
                "model": state.model_name,
                "data": [
                    {"object": "embedding", "index": index, "embedding": vector.tolist()}
                    for index, vector in enumerate(vectors)
                ],
                "usage": {"prompt_tokens": total, "total_tokens": total},
            }
        )

    def _pair(query: str, document: str) -> list[int]:
        model = loaded()
        tokens = model.tokenize(query, add_special=True)
        separator = model.sep_token if model.sep_token >= 0 else model.eos_token
        return [*tokens, separator, *model.tokenize(document, add_special=False)]

    async def _scores(query: str, documents: list[str]) -> tuple[list[float], int]:
        pairs = [_pair(query, document) for document in documents]
        pool = pooler()
        try:
            if pool.rank_head:
                scores = await anyio.to_thread.run_sync(pool.rank, pairs)
            else:
                # No classification head: cosine similarity of pooled embeddings.
                model = loaded()
                vectors = await anyio.to_thread.run_sync(
                    pool.embed,
                    [model.tokenize(query, add_special=True)]
                    + [model.tokenize(document, add_special=True) for document in documents],
                )
                scores = [float(vectors[0] @ vector) for vector in vectors[1:]]
        except ValueError as error:
            raise BadRequest(str(error)) from None
        return scores, sum(len(pair) for pair in pairs)

    @app.post("/v1/rerank")
    @app.post("/rerank")
    async def rerank() -> Response:
        body = await body_json()
        query, documents = body.get("query"), body.get("documents")
        if not isinstance(query, str):
            raise BadRequest("'query' must be a string", "query")
        if not isinstance(documents, list) or not documents:
            raise BadRequest("'documents' must be a non-empty list", "documents")
        texts = [doc if isinstance(doc, str) else (doc or {}).get("text") for doc in documents]
        if not all(isinstance(text, str) for text in texts):
            raise BadRequest("each document must be a string or {'text': ...}", "documents")
        scores, tokens = await _scores(query, [str(text) for text in texts])
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
        return json_response(
            {
                "model": state.model_name,
                "object": "list",
                "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    @app.post("/v1/score")
    @app.post("/score")
    async def score() -> Response:
        body = await body_json()
        first, second = body.get("text_1"), body.get("text_2")
        if not isinstance(first, str):
            raise BadRequest("'text_1' must be a string", "text_1")
        seconds = [second] if isinstance(second, str) else second
        if (
            not isinstance(seconds, list)
            or not seconds
            or not all(isinstance(s, str) for s in seconds)
        ):
            raise BadRequest("'text_2' must be a string or a non-empty list of strings", "text_2")
        scores, tokens = await _scores(first, seconds)
        return json_response(
            {
                "id": f"score-{uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": state.model_name,
                "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    # Read by `create_asgi`: streamed answers skip Quart (runner/streaming.py).
    app.extensions["dmr_streaming_routes"] = {
        "/v1/chat/completions": chat_answer,
        "/chat/completions": chat_answer,
        "/v1/completions": completion_answer,
        "/completions": completion_answer,
    }
    return app


def create_asgi(state: RunnerState) -> StreamingRoutes:
    """The runner's ASGI app: the Quart app behind the streaming fast path."""
    app = create_app(state)
    return StreamingRoutes(app, app.extensions["dmr_streaming_routes"])
