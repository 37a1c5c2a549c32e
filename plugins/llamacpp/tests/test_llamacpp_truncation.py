"""Ollama's truncation rules (runner/truncation.py) on plain data: which messages and
tokens a prompt longer than the context keeps. The real runner path is covered by
tests/test_openwebui_smollm2.py."""

from __future__ import annotations

from typing import Any

import pytest
from dmr_llamacpp.runner.truncation import fit_messages, fit_tokens, prompt_limit, wants_truncation


def render(messages: list[dict[str, Any]]) -> str:
    return "|".join(f"{m['role']}:{m['content']}" for m in messages)


def count(prompt: str) -> int:
    return len(prompt.split())  # one token per word


def conversation() -> list[dict[str, Any]]:
    words = " ".join(["w"] * 10)
    return [
        {"role": "system", "content": "rules"},
        *[
            {"role": role, "content": f"{role}{turn} {words}"}
            for turn in range(10)
            for role in ("user", "assistant")
        ],
        {"role": "user", "content": "newest question"},
    ]


def test_a_prompt_that_fits_is_untouched() -> None:
    messages = conversation()
    assert fit_messages(messages, render, count, context=10_000, n_keep=4) == render(messages)


def test_the_oldest_messages_go_first_and_the_system_prompt_stays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="dmr_llamacpp")
    messages = conversation()
    total = count(render(messages))
    prompt = fit_messages(messages, render, count, context=total - 1, n_keep=4)
    assert prompt.startswith("system:rules|")
    assert prompt.endswith("user:newest question")
    assert "user0" not in prompt  # the oldest turn went
    assert count(prompt) <= prompt_limit(total - 1, 4)
    # As many of the newest messages as fit: one more would not.
    kept = prompt.count("|")  # messages after the system prompt
    one_more = [messages[0], *messages[len(messages) - kept - 1 :]]
    assert count(render(one_more)) > prompt_limit(total - 1, 4)
    assert "truncating input messages" in caplog.text


def test_the_newest_message_is_always_kept() -> None:
    messages = conversation()
    prompt = fit_messages(messages, render, count, context=5, n_keep=4)
    assert prompt == "system:rules|user:newest question"


def test_tokens_keep_the_first_n_keep_and_the_newest() -> None:
    tokens = list(range(100))
    kept = fit_tokens(tokens, context=40, n_keep=4, adds_bos=True)
    assert kept[:5] == [0, 1, 2, 3, 4]  # BOS and num_keep
    assert kept[-1] == 99
    assert len(kept) == prompt_limit(40, 5) < 40
    assert kept[5:] == list(range(100 - (len(kept) - 5), 100))
    assert fit_tokens(tokens, context=101, n_keep=4, adds_bos=True) == tokens


def test_only_asked_for_truncation_applies() -> None:
    assert wants_truncation({}) is None
    assert wants_truncation({"truncate": False}) is None
    truncation = wants_truncation({"truncate": True, "n_keep": 8})
    assert truncation is not None and truncation.n_keep == 8
    default = wants_truncation({"truncate": True, "n_keep": "x"})
    assert default is not None and default.n_keep == 4
