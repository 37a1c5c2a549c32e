"""A generation body read once into its record (runner/requests.py): what the record
holds, and which bad field is reported first. No model needed; the routes' answers
to bad fields are checked against a real runner in test_llamacpp_runner.py."""

from __future__ import annotations

import math
from typing import Any

import pytest
from dmr.runner_support import BadRequest
from dmr_llamacpp.runner.logit_bias import token_biases
from dmr_llamacpp.runner.requests import (
    parse_chat_prompt,
    parse_chat_request,
    parse_completion_request,
)
from dmr_llamacpp.settings import WorkerSettings

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


def test_a_chat_body_becomes_one_record() -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "stop": "END",
        "logprobs": True,
        "top_logprobs": 2,
        "reasoning_budget": 0,
        "chat_template_kwargs": {"custom": 1},
        "truncate": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = parse_chat_request(body, WorkerSettings())
    assert request.prompt.messages == ({"role": "user", "content": "hi"},)
    assert request.prompt.variables == {"custom": 1, "enable_thinking": False}
    assert not request.prompt.with_tools and request.prompt.image_urls == ()
    assert request.sampling.temperature == 0.2
    assert request.sampling.stop == ("END",)
    assert request.sampling.logprobs == 2
    assert request.thinking_budget == 0
    assert request.truncation is not None and request.truncation.n_keep == 4
    assert request.split_reasoning and request.stream and request.include_usage
    with pytest.raises(AttributeError):
        request.stream = False  # type: ignore[misc]


def test_tools_bring_their_grammar_and_instruction() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    request = parse_chat_request(body, WorkerSettings())
    assert request.prompt.with_tools and request.prompt.tools == TOOLS
    assert request.sampling.grammar == request.prompt.tool_grammar is not None
    assert request.prompt.messages[0]["role"] == "system"
    # A tools answer follows the tools' grammar: response_format is not read.
    bad_format = {**body, "response_format": "json"}
    assert parse_chat_request(bad_format, WorkerSettings()).prompt.with_tools


def test_images_are_refused_before_the_sampling_fields() -> None:
    """A text-only model's 400 for images comes before a bad field after the messages,
    as it did when the route read the body piece by piece."""
    image = {"type": "image_url", "image_url": {"url": "data:one"}}
    body = {"messages": [{"role": "user", "content": [image]}], "temperature": "hot"}

    def text_only() -> None:
        raise BadRequest("no projector", "messages")

    with pytest.raises(BadRequest, match="no projector"):
        parse_chat_request(body, WorkerSettings(), accepts_images=text_only)
    with pytest.raises(BadRequest, match="'temperature' must be a number"):
        parse_chat_request(body, WorkerSettings(), accepts_images=lambda: None)


def test_usage_counts_only_in_a_stream() -> None:
    body = {"prompt": "x", "stream_options": {"include_usage": True}}
    whole = parse_completion_request(body, WorkerSettings())
    assert not whole.stream and not whole.include_usage
    streamed = parse_completion_request({**body, "stream": True}, WorkerSettings())
    assert streamed.stream and streamed.include_usage
    assert parse_completion_request({"prompt": ["x"]}, WorkerSettings()).prompt == "x"
    with pytest.raises(BadRequest, match="'prompt' must be a string"):
        parse_completion_request({"prompt": ["x", "y"], "temperature": "hot"}, WorkerSettings())


def test_apply_template_keeps_the_requests_own_variables() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"a": 1}}
    assert parse_chat_prompt(body).variables == {"a": 1}
    assert parse_chat_prompt({**body, "chat_template_kwargs": "x"}).variables is None


@pytest.mark.parametrize(
    ("raw", "pairs"),
    [
        ({"15": -100, "7": 2.5}, ((15, -100.0), (7, 2.5))),  # OpenAI: ids as strings
        ({"15": False}, ((15, -math.inf),)),  # llama-server: false bans the token
        ({" banana": 10}, ((" banana", 10.0),)),  # llama-server: a text, tokenized later
        ([[15, False], ["hi", -1]], ((15, -math.inf), ("hi", -1.0))),  # llama-server pairs
    ],
)
def test_logit_bias_takes_openais_and_llama_servers_forms(
    raw: object, pairs: tuple[tuple[int | str, float], ...]
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "logit_bias": raw}
    assert parse_chat_request(body, WorkerSettings()).sampling.logit_bias == pairs
    assert parse_completion_request({"prompt": "hi", "logit_bias": raw}, WorkerSettings())


@pytest.mark.parametrize(
    "raw",
    [
        {"15": "high"},  # not a number
        {"15": True},  # only false has a meaning
        {"": 1},  # no token
        [[15]],  # not a pair
        "15:-100",  # neither an object nor a list
        {"15": math.nan},
    ],
)
def test_a_logit_bias_it_cannot_read_is_a_400_naming_it(raw: object) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "logit_bias": raw}
    with pytest.raises(BadRequest) as caught:
        parse_chat_request(body, WorkerSettings())
    assert caught.value.param == "logit_bias"


def test_logit_bias_texts_become_their_tokens_and_ids_must_be_in_the_vocabulary() -> None:
    tokens = {"ab": [3, 4], "zz": []}
    pairs = token_biases(((7, 1.0), ("ab", -2.0)), tokens.__getitem__, n_vocab=10)
    assert pairs == ((7, 1.0), (3, -2.0), (4, -2.0))
    for bad in ((10, 1.0), (-1, 1.0), ("zz", 1.0)):
        with pytest.raises(BadRequest) as caught:
            token_biases((bad,), tokens.__getitem__, n_vocab=10)
        assert caught.value.param == "logit_bias"
