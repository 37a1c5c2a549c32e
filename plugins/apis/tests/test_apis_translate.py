"""Pure translation helpers."""

from __future__ import annotations

import pytest
from dmr.errors import InvalidRequestError
from dmr_apis.anthropic.translate import anthropic_stop_reason, openai_messages
from dmr_apis.common.tool_calls import ToolCallAccumulator, parse_arguments
from dmr_apis.ollama.translate import (
    final_stats,
    options_to_openai,
    parse_keep_alive,
    response_format,
)
from dmr_apis.responses.store import ResponseStore, StoredResponse


def test_tool_call_fragments_merge_by_index() -> None:
    calls = ToolCallAccumulator()
    calls.add([{"index": 0, "id": "a", "function": {"name": "get_", "arguments": '{"ci'}}])
    calls.add([{"index": 1, "id": "b", "function": {"name": "other", "arguments": "{}"}}])
    calls.add([{"index": 0, "function": {"name": "weather", "arguments": 'ty": 1}'}}])
    first, second = calls.finished()
    assert (first.id, first.name, parse_arguments(first.arguments)) == (
        "a",
        "get_weather",
        {"city": 1},
    )
    assert (second.id, second.name) == ("b", "other")


def test_broken_tool_arguments_become_empty() -> None:
    assert parse_arguments("{not json") == {}
    assert parse_arguments("[1]") == {"value": [1]}


def test_ollama_options() -> None:
    fields = options_to_openai(
        {"num_predict": -1, "num_ctx": 4096, "stop": "x", "seed": 3.0, "mirostat": 2}
    )
    assert fields == {"seed": 3, "stop": ["x"], "mirostat": 2}
    # The sampling options llama.cpp has too go to the runner under its names.
    sampling = {"repeat_last_n": 64.0, "typical_p": 0.7, "mirostat_tau": 3, "mirostat_eta": 0.2}
    assert options_to_openai(sampling) == {**sampling, "repeat_last_n": 64}
    with pytest.raises(InvalidRequestError):
        options_to_openai({"top_p": "high"})
    with pytest.raises(InvalidRequestError):
        options_to_openai({"stop": [1]})


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5m", 300.0), (0, 0.0), ("-1", -1.0), (90, 90.0), ("1h30m", 5400.0), (None, None)],
)
def test_keep_alive(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


def test_keep_alive_rejects_nonsense() -> None:
    with pytest.raises(InvalidRequestError):
        parse_keep_alive("soon")
    with pytest.raises(InvalidRequestError):
        parse_keep_alive([1])


def test_format() -> None:
    assert response_format("json") == {"type": "json_object"}
    assert response_format(None) is None
    schema = {"type": "object"}
    assert response_format(schema)["json_schema"]["schema"] == schema  # type: ignore[index]
    with pytest.raises(InvalidRequestError):
        response_format("yaml")


def test_final_stats_in_nanoseconds() -> None:
    stats = final_stats(
        total_seconds=1.0,
        load_seconds=0.25,
        timings={"prompt_n": 4, "prompt_ms": 10, "predicted_n": 2, "predicted_ms": 20.5},
        usage=None,
    )
    assert stats == {
        "total_duration": 1_000_000_000,
        "load_duration": 250_000_000,
        "prompt_eval_count": 4,
        "prompt_eval_duration": 10_000_000,
        "eval_count": 2,
        "eval_duration": 20_500_000,
    }
    fallback = final_stats(
        total_seconds=1.0,
        load_seconds=0.0,
        timings=None,
        usage={"prompt_tokens": 3, "completion_tokens": 5},
    )
    assert fallback["eval_count"] == 5 and fallback["eval_duration"] == 1_000_000_000


def test_anthropic_stop_reasons() -> None:
    assert anthropic_stop_reason("stop", matched_stop=None, stop_sequences=None) == (
        "end_turn",
        None,
    )
    assert anthropic_stop_reason("length", matched_stop=None, stop_sequences=None)[0] == (
        "max_tokens"
    )
    assert anthropic_stop_reason("tool_calls", matched_stop=None, stop_sequences=None)[0] == (
        "tool_use"
    )
    assert anthropic_stop_reason("stop", matched_stop="END", stop_sequences=["END"]) == (
        "stop_sequence",
        "END",
    )


def test_anthropic_images_and_unknown_blocks() -> None:
    messages = openai_messages(
        None,
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {
                        "type": "image",
                        # "/9j/4A==" is a JPEG's signature (the dialect checks no more).
                        "source": {
                            "type": "base64",
                            "media_type": "image/jpeg",
                            "data": "/9j/4A==",
                        },
                    },
                ],
            }
        ],
    )
    assert messages[0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/jpeg;base64,/9j/4A=="},
    }
    with pytest.raises(InvalidRequestError):
        openai_messages(None, [{"role": "user", "content": [{"type": "hologram"}]}])
    with pytest.raises(InvalidRequestError):
        openai_messages(None, [])


def test_response_store_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    import dmr_apis.responses.store as module

    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    store = ResponseStore(ttl=3600)
    store.put("resp_1", StoredResponse(response={}, input_items=[], conversation=[]))
    now[0] += 3599
    assert store.get("resp_1") is not None
    now[0] += 2
    assert store.get("resp_1") is None


def test_pull_progress_in_ollama_shape() -> None:
    from dmr.records import ProgressEvent
    from dmr_apis.ollama.model_routes import _ollama_progress

    layer = ProgressEvent(
        type="progress",
        message="Downloaded: 1.00 MB",
        total=10,
        layer_id="sha256:" + "ab" * 32,
        layer_size=10,
        layer_current=4,
    )
    assert _ollama_progress(layer, "pulling") == {
        "status": "pulling abababababab",
        "digest": "sha256:" + "ab" * 32,
        "total": 10,
        "completed": 4,
    }
    assert _ollama_progress(ProgressEvent(type="error", message="boom"), "pulling") == {
        "error": "boom"
    }
    assert _ollama_progress(ProgressEvent(type="success", message="done"), "pulling") == {
        "status": "done"
    }
