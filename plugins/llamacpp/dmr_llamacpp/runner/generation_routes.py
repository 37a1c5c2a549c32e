"""Chat and text completions: whole answers through Quart, streamed ones past it.

`chat_answer` and `completion_answer` are the answers to both; a streamed request
normally reaches them through `StreamingRoutes` (runner/streaming.py), which
sends each event to hypercorn itself. The per-token path of a stream is kept
lean on purpose: a content-only chunk is a pre-encoded template around the
token's JSON string (`content_chunk_encoder`).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from dmr.sdk.runner import BadRequest, DirectWriter, error_response, json_response
from quart import Blueprint, Response

from dmr_llamacpp.runner.batching import (
    Failed,
    Finished,
    GenerationJob,
    SinkWake,
    TextDelta,
    TokenLogprob,
)
from dmr_llamacpp.runner.chat import parse_tool_output
from dmr_llamacpp.runner.direct_sink import DirectSink, Encode
from dmr_llamacpp.runner.image_jobs import start_image_job
from dmr_llamacpp.runner.logit_bias import token_biases
from dmr_llamacpp.runner.media import load_images
from dmr_llamacpp.runner.openai_bodies import (
    DONE_EVENT,
    answer_base,
    content_chunk_encoder,
    end_fields,
    logprobs_chat,
    logprobs_completion,
    sse,
    sse_error,
    usage,
    whole_body,
)
from dmr_llamacpp.runner.priority import batch_request, lone_request
from dmr_llamacpp.runner.reasoning import (
    THINK_CLOSE,
    ReasoningSplitter,
    ThinkingBudget,
    starts_thinking,
)
from dmr_llamacpp.runner.requests import (
    ChatRequest,
    parse_chat_request,
    parse_completion_request,
)
from dmr_llamacpp.runner.sampling import SamplingParams
from dmr_llamacpp.runner.state import RunnerState, request_body, runner_state
from dmr_llamacpp.runner.streaming import Answer
from dmr_llamacpp.runner.truncation import Truncation, fit_messages, fit_tokens

__all__ = ["blueprint", "chat_answer", "completion_answer", "streamed_answers"]

GenerationAnswer = Response | AsyncIterable[bytes]

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
COMPLETION_PATHS = ("/v1/completions", "/completions")

blueprint = Blueprint("dmr_llamacpp_generation", __name__)


def streamed_answers(state: RunnerState) -> dict[str, Answer]:
    """The answers `StreamingRoutes` calls for streamed requests, by path."""
    chat = functools.partial(chat_answer, state)
    completion = functools.partial(completion_answer, state)
    return {
        **{path: chat for path in CHAT_PATHS},
        **{path: completion for path in COMPLETION_PATHS},
    }


async def chat_completions() -> Response:
    return _response(await chat_answer(runner_state(), await request_body()))


async def completions() -> Response:
    return _response(await completion_answer(runner_state(), await request_body()))


for _path in CHAT_PATHS:
    blueprint.add_url_rule(_path, view_func=chat_completions, methods=["POST"])
for _path in COMPLETION_PATHS:
    blueprint.add_url_rule(_path, view_func=completions, methods=["POST"])


def _response(answer: GenerationAnswer) -> Response:
    if isinstance(answer, Response):
        return answer
    return Response(answer, content_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chat_answer(state: RunnerState, body: dict[str, Any]) -> GenerationAnswer:
    """The whole answer, or for `stream` its SSE events (see `StreamingRoutes`)."""
    request = parse_chat_request(
        body,
        state.settings,
        media_marker=state.media_marker,
        accepts_images=state.require_projector,  # a text-only model: a 400 before any download
    )
    prompt = _chat_prompt(state, request)
    thinking = starts_thinking(prompt)
    limit = _thinking_limit(state, request.thinking_budget, inside=thinking)
    params = _with_token_biases(state, request.sampling)
    if request.prompt.image_urls:
        images = await load_images(request.prompt.image_urls, state.image_limits)
        job = await start_image_job(state, prompt, images, params, limit)
    else:
        job = _start_job(state, prompt, params, limit, request.truncation)
    base = answer_base("chatcmpl", state.model_name)
    split, with_tools = request.split_reasoning, request.prompt.with_tools
    if request.stream:
        splitter = ReasoningSplitter(thinking=thinking) if split else None
        return _chat_stream(
            job, base, splitter, with_tools=with_tools, include_usage=request.include_usage
        )
    logprobs = params.logprobs is not None
    return await _whole_answer(
        job,
        base,
        "chat.completion",
        lambda whole: _chat_choice(whole, with_tools, logprobs, split and thinking, split),
    )


def _chat_prompt(state: RunnerState, request: ChatRequest) -> str:
    """The rendered chat; with truncation asked for (and no images), the oldest messages
    go while it does not fit the slot."""
    truncation = request.truncation
    if truncation is None or request.prompt.image_urls:
        return state.render_prompt(request.prompt)
    model = state.require_model()
    return fit_messages(
        list(request.prompt.messages),
        lambda kept: state.render_prompt(request.prompt, kept),
        lambda text: len(model.tokenize(text, add_special=True, parse_special=True)),
        context=state.require_generator().ctx_per_slot,
        n_keep=truncation.n_keep,
    )


def _with_token_biases(state: RunnerState, params: SamplingParams) -> SamplingParams:
    """`params` with the texts in its logit_bias tokenized (a 400 for a bias the model
    cannot take, runner/logit_bias.py)."""
    if not params.logit_bias:
        return params
    model = state.require_model()
    biases = token_biases(
        params.logit_bias,
        lambda text: model.tokenize(text, add_special=False, parse_special=False),
        model.n_vocab,
    )
    return replace(params, logit_bias=biases)


def _thinking_limit(state: RunnerState, budget: int, *, inside: bool) -> ThinkingBudget | None:
    """The thinking budget's stop (None: unlimited); `inside`: the prompt opened the thinking."""
    if budget < 0:
        return None
    close = state.require_model().tokenize(
        THINK_CLOSE + "\n\n", add_special=False, parse_special=True
    )
    return ThinkingBudget(budget, tuple(close), inside=inside)


async def completion_answer(state: RunnerState, body: dict[str, Any]) -> GenerationAnswer:
    request = parse_completion_request(body, state.settings)
    params = _with_token_biases(state, request.sampling)
    job = _start_job(state, request.prompt, params, truncation=request.truncation)
    base = answer_base("cmpl", state.model_name)
    if request.stream:
        return _completion_stream(job, base, request.include_usage)
    logprobs = params.logprobs is not None
    return await _whole_answer(
        job, base, "text_completion", lambda whole: _completion_choice(whole, logprobs)
    )


async def _whole_answer(
    job: GenerationJob,
    base: dict[str, Any],
    kind: str,
    choice_of: Callable[[_Collected], dict[str, Any]],
) -> Response:
    """A non-streamed answer: `job` run to its end; a failed generation is a 500."""
    try:
        whole = await _collect(job)
    except RuntimeError as error:
        return error_response(str(error), 500)
    return json_response(whole_body(base, kind, choice_of(whole), whole.done))


def _chat_choice(
    whole: _Collected, with_tools: bool, logprobs: bool, thinking: bool, split: bool
) -> dict[str, Any]:
    text = whole.text
    reasoning = ""
    if split:
        splitter = ReasoningSplitter(thinking=thinking)
        reasoning, text = splitter.push(text)
        held_reasoning, held_text = splitter.finish()
        reasoning, text = (reasoning + held_reasoning).rstrip(), text + held_text
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning:
        message["reasoning_content"] = reasoning
    finish = whole.done.reason
    if with_tools:
        content, calls = parse_tool_output(text)
        message["content"] = content
        if calls:
            message["tool_calls"] = [
                {"id": _call_id(), "type": "function", "function": call} for call in calls
            ]
            finish = "tool_calls"
    return {
        "index": 0,
        "message": message,
        "finish_reason": finish,
        "logprobs": logprobs_chat(whole.logprobs) if logprobs else None,
    }


def _completion_choice(whole: _Collected, logprobs: bool) -> dict[str, Any]:
    return {
        "index": 0,
        "text": whole.text,
        "finish_reason": whole.done.reason,
        "logprobs": logprobs_completion(whole.logprobs, 0) if logprobs else None,
    }


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _start_job(
    state: RunnerState,
    prompt: str,
    params: SamplingParams,
    thinking: ThinkingBudget | None = None,
    truncation: Truncation | None = None,
) -> GenerationJob:
    model = state.require_model()
    tokens = model.tokenize(prompt, add_special=True, parse_special=True)
    if not tokens:
        tokens = [model.bos_token]
    if truncation is not None:
        tokens = fit_tokens(
            tokens,
            context=state.require_generator().ctx_per_slot,
            n_keep=truncation.n_keep,
            adds_bos=model.adds_bos,
        )
    job = GenerationJob(tokens, params, batch=batch_request.get(), lone=lone_request.get())
    job.thinking = thinking
    try:
        state.require_generator().submit(job)
    except ValueError as error:
        raise BadRequest(str(error)) from None
    return job


async def _event_batches(
    job: GenerationJob,
) -> AsyncIterator[list[TextDelta | Finished | SinkWake]]:
    """The job's events until it finishes, as the decode loop hands them over: one
    batch per step (a token's text, or the last one's with the end). A streamed
    answer writes each batch as one chunk: every chunk is a send through hypercorn
    here and through `dmr serve`, and a one-token answer was five (role, content,
    end, usage, [DONE]). Leaving early (disconnect) cancels the job's slot."""
    try:
        while True:
            batch = [await job.events.get()]
            while not job.events.empty():
                batch.append(job.events.get_nowait())
            ended: list[TextDelta | Finished | SinkWake] = []
            for event in batch:
                if isinstance(event, Failed):
                    if ended:
                        yield ended
                    raise RuntimeError(event.message)
                ended.append(event)
                if isinstance(event, Finished):
                    yield ended
                    return
            yield ended
    finally:
        job.cancel()


async def _events(job: GenerationJob) -> AsyncIterator[TextDelta | Finished]:
    """The job's events one by one (see `_event_batches`)."""
    async for batch in _event_batches(job):
        for event in batch:
            if not isinstance(event, SinkWake):  # only direct streams get these
                yield event


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


class StepWrites:
    """A streamed answer's writes: `encode` adds each event's SSE chunks to a list, and
    each decode step's go out as one write (see `_event_batches`); the end goes out
    with `[DONE]`, and a failed generation as an error event before it.

    An async iterator of those writes, for `send_streamed`. Once the server hands the
    runner the client's socket (`go_direct`, dmr/direct_streams.py), the decode
    thread writes the steps itself (runner/direct_sink.py) and this iterator only
    writes what it leaves."""

    def __init__(self, job: GenerationJob, encode: Encode, first: list[bytes]) -> None:
        self.job = job
        self.encode = encode
        self.sink: DirectSink | None = None
        # A direct stream's last chunk, which `send_streamed` sends through the server
        # after the summary (runner/direct_sink.py).
        self.final_chunk: bytes | None = None
        self._writes = self._steps(first)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._writes

    async def aclose(self) -> None:
        # Closed at a `yield`, `_steps` leaves `_event_batches` open until it is
        # collected; the answer's reader is gone now, so the slot is freed now.
        self.job.cancel()
        await self._writes.aclose()

    def go_direct(self, writer: DirectWriter) -> None:
        """From now on the decode thread writes this stream to `writer`'s socket."""
        self.sink = DirectSink(writer, self.encode, self.job)
        self.job.sink = self.sink

    async def _steps(self, out: list[bytes]) -> AsyncGenerator[bytes, None]:
        try:
            async for batch in _event_batches(self.job):
                for event in batch:
                    if isinstance(event, SinkWake):
                        if out:  # what came before the wake goes out first
                            yield b"".join(out)
                            out = []
                        if self.sink is not None:
                            last = await self.sink.drain()
                            if last is not None:  # the stream has ended
                                self.final_chunk = last
                                return
                        continue
                    self.encode(event, out)
                if isinstance(batch[-1], TextDelta) and out:
                    yield b"".join(out)
                    out = []
        except RuntimeError as error:
            out.append(sse_error(str(error)))
        out.append(DONE_EVENT)
        if self.sink is not None:
            self.final_chunk = b"".join(out)
            return
        yield b"".join(out)


def _chat_stream(
    job: GenerationJob,
    base: dict[str, Any],
    splitter: ReasoningSplitter | None,
    *,
    with_tools: bool,
    include_usage: bool,
) -> StepWrites:
    chunk_base = {**base, "object": "chat.completion.chunk"}
    content_chunk = content_chunk_encoder(chunk_base)

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
        return sse(
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

    held: list[str] = []

    def encode(event: TextDelta | Finished, out: list[bytes]) -> None:
        if isinstance(event, TextDelta):
            text = event.text
            if splitter is not None:
                reasoning, text = splitter.push(text)
                if reasoning:  # thinking streams as it comes, tools or not
                    out.append(chunk({"reasoning_content": reasoning}, None))
            if with_tools:
                held.append(text)  # tool calls go out whole, at the end
            elif job.params.logprobs is None:
                if text:
                    out.append(content_chunk(text))
            elif text or event.logprobs:
                logprobs = logprobs_chat(event.logprobs)
                out.append(chunk({"content": text}, None, logprobs=logprobs))
            return
        if splitter is not None:
            reasoning, text = splitter.finish()
            if reasoning:
                out.append(chunk({"reasoning_content": reasoning}, None))
            if text and not with_tools:
                out.append(content_chunk(text))
            held.append(text)
        finish = event.reason
        if with_tools:
            content, calls = parse_tool_output("".join(held))
            if calls:
                finish = "tool_calls"
                tool_calls = [
                    {"index": i, "id": _call_id(), "type": "function", "function": call}
                    for i, call in enumerate(calls)
                ]
                out.append(chunk({"tool_calls": tool_calls}, None))
            elif content:
                out.append(chunk({"content": content}, None))
        out.append(chunk({}, finish, **end_fields(event)))
        if include_usage:
            out.append(sse({**chunk_base, "choices": [], "usage": usage(event)}))

    # The role goes out with the first token, as llama-server sends it.
    return StepWrites(job, encode, [chunk({"role": "assistant", "content": ""}, None)])


def _completion_stream(job: GenerationJob, base: dict[str, Any], include_usage: bool) -> StepWrites:
    chunk_base = {**base, "object": "text_completion"}
    offset = 0

    def encode(event: TextDelta | Finished, out: list[bytes]) -> None:
        nonlocal offset
        if isinstance(event, TextDelta):
            logprobs = (
                logprobs_completion(event.logprobs, offset)
                if job.params.logprobs is not None
                else None
            )
            offset += len(event.text)
            if event.text or event.logprobs:
                choice = {
                    "index": 0,
                    "text": event.text,
                    "logprobs": logprobs,
                    "finish_reason": None,
                }
                out.append(sse({**chunk_base, "choices": [choice]}))
            return
        end = {"index": 0, "text": "", "logprobs": None, "finish_reason": event.reason}
        out.append(sse({**chunk_base, "choices": [end], **end_fields(event)}))
        if include_usage:
            out.append(sse({**chunk_base, "choices": [], "usage": usage(event)}))

    return StepWrites(job, encode, [])
