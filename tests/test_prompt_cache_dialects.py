"""Prompt caching seen through every dialect, on a live server with SmolLM2.

The llama.cpp runner keeps a slot's KV cells after a request; a request that
resends the same conversation decodes only what is new. Each dialect says so in
its own words: OpenAI `usage.prompt_tokens_details.cached_tokens`, Responses
`usage.input_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`
(apart from `input_tokens`), and Ollama, which has no such field, keeps
`prompt_eval_count` the whole prompt.
"""

from __future__ import annotations

import uuid

import anthropic
import ollama
import openai
import pytest
from dmr_llamacpp.runner.row_kinds import repeat_tail

from tests.fixtures.server import DmrServer

pytestmark = [pytest.mark.llama, pytest.mark.xdist_group("smollm2")]

MODEL = "ai/smollm2"
N_UBATCH = 512  # the runner's default micro-batch


def reused(prompt_tokens: int) -> int:
    """The cached tokens of a greedy request repeating a prompt: all but the last rows
    that make its logits a cold prefill's (runner/row_kinds.py)."""
    return prompt_tokens - repeat_tail(prompt_tokens, N_UBATCH)


def fresh_question() -> str:
    """A question no earlier request shares more than the template's frame with."""
    return f"Ticket {uuid.uuid4().hex}: in one sentence, what is a harbour?"


def test_openai_chat_reports_cached_tokens(api_server: DmrServer) -> None:
    client = openai.OpenAI(base_url=f"{api_server.url}/engines/v1", api_key="unused")
    messages = [{"role": "user", "content": fresh_question()}]
    first = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    again = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert first.usage is not None and again.usage is not None
    assert first.usage.prompt_tokens == again.usage.prompt_tokens
    assert first.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details is not None
    assert (first.usage.prompt_tokens_details.cached_tokens or 0) < first.usage.prompt_tokens // 2
    assert again.usage.prompt_tokens_details.cached_tokens == reused(again.usage.prompt_tokens)
    # (Answers are not compared: reused cells can tip a near-tie in greedy decoding,
    # as in llama-server; the runner's tests compare the logits instead.)
    assert again.choices[0].message.content

    # Streamed answers carry it in the usage chunk too.
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == reused(usage.prompt_tokens)


def test_responses_reports_cached_tokens(api_server: DmrServer) -> None:
    client = openai.OpenAI(base_url=f"{api_server.url}/v1", api_key="unused")
    question = fresh_question()
    client.responses.create(model=MODEL, input=question, max_output_tokens=8, temperature=0)
    again = client.responses.create(model=MODEL, input=question, max_output_tokens=8, temperature=0)
    assert again.usage is not None
    assert again.usage.input_tokens_details.cached_tokens == reused(again.usage.input_tokens)


def test_anthropic_reports_cache_reads_apart(api_server: DmrServer) -> None:
    client = anthropic.Anthropic(
        base_url=f"{api_server.url}/anthropic", api_key="unused", max_retries=0
    )
    messages = [{"role": "user", "content": fresh_question()}]
    counted = client.messages.count_tokens(model=MODEL, messages=messages)  # type: ignore[arg-type]
    client.messages.create(model=MODEL, max_tokens=8, messages=messages)  # type: ignore[arg-type]
    again = client.messages.create(model=MODEL, max_tokens=8, messages=messages)  # type: ignore[arg-type]
    assert again.usage.cache_read_input_tokens == counted.input_tokens - 1
    assert again.usage.input_tokens == 1
    assert again.usage.cache_creation_input_tokens == 0

    with client.messages.stream(model=MODEL, max_tokens=8, messages=messages) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) == (
        counted.input_tokens
    )
    assert final.usage.cache_read_input_tokens == counted.input_tokens - 1


def test_ollama_counts_the_whole_prompt(api_server: DmrServer) -> None:
    client = ollama.Client(host=api_server.url)
    messages = [{"role": "user", "content": fresh_question()}]
    options = {"num_predict": 8, "temperature": 0}
    first = client.chat(model="smollm2", messages=messages, options=options)
    again = client.chat(model="smollm2", messages=messages, options=options)
    assert first.prompt_eval_count and first.prompt_eval_count > 10
    assert again.prompt_eval_count == first.prompt_eval_count
