"""Reasoning models: `<think>` text split out as `reasoning_content`, and the thinking
budget. SmolLM2 never thinks on its own, so a grammar makes it write the tags."""

from __future__ import annotations

import json
from typing import Any

import pytest
from dmr_llamacpp.runner.chat import ChatTemplate
from dmr_llamacpp.runner.reasoning import ReasoningSplitter, starts_thinking
from llamacpp_helpers import RunnerProcess

HELLO = [{"role": "user", "content": "Say hi."}]
# Thinking in lowercase words, then the answer: the shape DeepSeek-R1 and Qwen3 write.
# A fixed 20 characters of thinking: a range such as {20,60} makes llama.cpp's grammar
# sampler track every remaining optional character for each of the 49k candidate
# tokens, three to five times the cost per token, and on a loaded CI machine one
# request then took over the client's 120 s.
THINKING_GRAMMAR = 'root ::= "<think>" [a-z ]{20} "</think>" "Hello" [a-z ]{0,20}'


def split_all(deltas: list[str], *, thinking: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter(thinking=thinking)
    reasoning: list[str] = []
    content: list[str] = []
    for delta in [*deltas, None]:
        r, c = splitter.push(delta) if delta is not None else splitter.finish()
        reasoning.append(r)
        content.append(c)
    return "".join(reasoning), "".join(content)


def test_splitter_without_tags_is_all_content() -> None:
    assert split_all(["Hello", " world", " a < b"]) == ("", "Hello world a < b")


def test_splitter_tags_whole_and_cut_across_deltas() -> None:
    assert split_all(["<think>\nhmm</think>\n\nHi"]) == ("hmm", "Hi")
    text = "<think>\nlet me see</think>\n\nThe answer"
    for cut in range(1, len(text)):
        assert split_all([text[:cut], text[cut:]]) == ("let me see", "The answer"), cut
    assert split_all(list(text)) == ("let me see", "The answer")


def test_splitter_starting_inside_thinking() -> None:
    assert split_all(["\nhm", "m</th", "ink>", "\nok"], thinking=True) == ("hmm", "ok")
    assert starts_thinking("<|im_start|>assistant\n<think>\n")
    assert not starts_thinking("<|im_start|>assistant\n")


def test_splitter_unfinished_tag_is_text() -> None:
    assert split_all(["a <thi"]) == ("", "a <thi")
    assert split_all(["<think>x </thi"]) == ("x </thi", "")


def test_template_gets_chat_template_kwargs() -> None:
    source = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
        "{% else %}<think>\n{% endif %}"
    )
    template = ChatTemplate(source, bos_token="", eos_token="")
    assert template.render(HELLO).endswith("<think>\n")
    off = template.render(HELLO, extra={"enable_thinking": False, "messages": "ignored"})
    assert off == "Say hi.<think>\n\n</think>\n\n"


def chat(runner: RunnerProcess, **extra: Any) -> dict[str, Any]:
    request = {"messages": HELLO, "temperature": 0, "grammar": THINKING_GRAMMAR, **extra}
    with runner.client() as client:
        response = client.post("/v1/chat/completions", json={"max_tokens": 60, **request})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_reasoning_content_whole_and_streamed(completion_runner: RunnerProcess) -> None:
    message = chat(completion_runner)["choices"][0]["message"]
    assert message["reasoning_content"]
    assert "<think>" not in message["content"] and "</think>" not in message["content"]
    assert message["content"].startswith("Hello")

    request = {"messages": HELLO, "temperature": 0, "grammar": THINKING_GRAMMAR}
    with (
        completion_runner.client() as client,
        client.stream(
            "POST", "/v1/chat/completions", json={**request, "max_tokens": 60, "stream": True}
        ) as response,
    ):
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line) for line in lines if line != "[DONE]"]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    reasoning = [d["reasoning_content"] for d in deltas if d.get("reasoning_content")]
    content = "".join(d.get("content") or "" for d in deltas)
    assert len(reasoning) > 1  # streamed as it comes, not at the end
    assert "".join(reasoning).strip() == message["reasoning_content"]
    assert content == message["content"]

    raw = chat(completion_runner, reasoning_format="none")["choices"][0]["message"]
    assert raw["content"].startswith("<think>") and "reasoning_content" not in raw


def test_reasoning_budget(completion_runner: RunnerProcess) -> None:
    # Budget 0: the close tag is forced right after `<think>`, so nothing is thought.
    message = chat(completion_runner, reasoning_budget=0)["choices"][0]["message"]
    assert "reasoning_content" not in message
    assert message["content"]
    # `enable_thinking: false` is the same switch.
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    assert "reasoning_content" not in chat(completion_runner, **kwargs)["choices"][0]["message"]

    unlimited = chat(completion_runner)["choices"][0]["message"]["reasoning_content"]
    choice = chat(completion_runner, reasoning_budget=3, logprobs=True)["choices"][0]
    message = choice["message"]
    # The generated tokens in order: those after `<think>` and before `</think>` are thinking.
    tokens = [entry["token"] for entry in choice["logprobs"]["content"]]
    text = "".join(tokens)
    opened, closed = text.index("<think>") + len("<think>"), text.index("</think>")
    ends = [len("".join(tokens[: i + 1])) for i in range(len(tokens))]
    spans = zip(tokens, ends, strict=True)
    thinking = sum(opened < end and end - len(token) < closed for token, end in spans)
    assert thinking == 3, tokens
    assert message["reasoning_content"]
    assert len(message["reasoning_content"]) < len(unlimited)
    assert message["content"]  # the answer goes on after the forced close


@pytest.mark.parametrize("budget", [-2, "3", True])
def test_reasoning_budget_must_be_a_count(completion_runner: RunnerProcess, budget: Any) -> None:
    with completion_runner.client() as client:
        response = client.post(
            "/v1/chat/completions", json={"messages": HELLO, "reasoning_budget": budget}
        )
    assert response.status_code == 400
