"""`AnswerFold`: one reading of a runner's OpenAI answer, streamed or whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from dmr_apis.common.answer_fold import AnswerFold, TextDelta, fold_answer

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
TIMINGS = {"prompt_n": 5, "predicted_n": 3}

CHUNKS: list[dict[str, Any]] = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]},
    {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
    {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"a"'}}
                    ]
                },
            }
        ]
    },
    {
        "choices": [
            {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}}
        ]
    },
    {
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "stopping_word": "END",
        "timings": TIMINGS,
    },
    {"choices": [], "usage": USAGE},
]


async def _stream(chunks: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for chunk in chunks:
        yield chunk


async def test_a_stream_gives_its_text_and_folds_the_rest() -> None:
    answer = AnswerFold()
    texts = [text async for text in answer.deltas(_stream(CHUNKS))]
    assert texts == [TextDelta("", "hmm"), TextDelta("Hi")]
    assert (answer.content, answer.reasoning) == ("Hi", "hmm")
    assert [(call.id, call.name, call.arguments) for call in answer.calls] == [
        ("c1", "f", '{"a":1}')
    ]
    assert answer.finish_reason == "stop" and answer.matched_stop == "END"
    assert answer.usage == USAGE and answer.timings == TIMINGS


def test_a_choice_stop_reason_wins_over_the_stopping_word() -> None:
    answer = AnswerFold()
    answer.add({"choices": [{"finish_reason": "stop", "stop_reason": "a"}], "stopping_word": "b"})
    assert answer.matched_stop == "a"


def test_a_whole_chat_answer_reads_like_its_stream() -> None:
    body = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "hmm",
                    "tool_calls": [
                        {"id": "c1", "function": {"name": "f", "arguments": "{}"}},
                        {"id": "c2", "function": {"name": "g", "arguments": {"x": 1}}},
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": USAGE,
        "timings": TIMINGS,
    }
    answer = fold_answer(body)
    assert (answer.content, answer.reasoning) == ("", "hmm")
    assert [(call.id, call.arguments) for call in answer.calls] == [
        ("c1", "{}"),
        ("c2", '{"x": 1}'),
    ]
    assert answer.finish_reason == "tool_calls"
    assert answer.usage == USAGE and answer.timings == TIMINGS


def test_a_text_completion_gives_its_text() -> None:
    answer = fold_answer({"choices": [{"text": "Once", "finish_reason": "length"}]})
    assert answer.content == "Once" and answer.finish_reason == "length"
    assert not answer.tool_calls
    assert fold_answer({}).content == ""
