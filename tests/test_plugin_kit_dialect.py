"""A third party can write an API dialect from the dialect kit alone: the test engine
plugin's `/test-dialect/echo` (tests/plugins/dmr_test_engine/dmr_test_engine/dialect.py,
which imports only `dmr.sdk` and `dmr.sdk.dialect`) resolves a model and calls its
runner through a real `dmr serve`, recorded and counted like the bundled dialects'
requests."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import add_test_model

ECHO = "/test-dialect/echo"


def ndjson(server: DmrServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    with server.client() as client, client.stream("POST", ECHO, json=body) as answer:
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in answer.iter_lines() if line]


def test_a_kit_dialect_resolves_the_model_and_calls_its_runner(
    test_engine_server: DmrServer,
) -> None:
    server = test_engine_server
    stored = add_test_model(server.models_path, "test/kit")
    with server.client() as client:
        answer = client.post(ECHO, json={"model": "test/kit", "prompt": "hello kit"})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "model": "test/kit",
            "id": stored.id,
            "reply": "[1 messages] echo: hello kit",
        }
        recorded = client.get("/engines/requests", params={"model": "test/kit"}).json()
        metrics = client.get("/metrics").text
    assert [(item["model"], item["status"]) for item in recorded] == [("test/kit", 200)]
    assert recorded[0]["request"]["messages"][0]["content"] == "hello kit"
    counted = [
        sample
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "dmr_requests_total" and sample.labels.get("dialect") == "test-dialect"
    ]
    assert [(s.labels["model"], s.labels["status"], s.value) for s in counted] == [
        ("test/kit", "200", 1.0)
    ]


def test_a_kit_dialect_streams_the_runner_answer(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/kit-stream")
    lines = ndjson(
        test_engine_server, {"model": "test/kit-stream", "prompt": "one two three", "stream": True}
    )

    assert lines[-1] == {"done": True}
    assert "".join(line["text"] for line in lines[:-1]) == "[1 messages] echo: one two three"
    assert len(lines) > 2  # piece by piece, as the runner sent them


def test_a_runner_that_dies_mid_stream_ends_the_stream_with_its_reason(
    test_engine_server: DmrServer,
) -> None:
    add_test_model(test_engine_server.models_path, "test/kit-dies")
    lines = ndjson(
        test_engine_server, {"model": "test/kit-dies", "prompt": "[die]", "stream": True}
    )

    assert [line["text"] for line in lines[:-1]] == ["[1 ", "messages] "]
    assert "GGML_ASSERT: the test runner gave up" in lines[-1]["error"]


def test_errors_before_the_answer_are_the_servers_json_errors(
    test_engine_server: DmrServer,
) -> None:
    add_test_model(test_engine_server.models_path, "test/kit-fails", fail_load="no weights")
    with test_engine_server.client() as client:
        missing = client.post(ECHO, json={"model": "test/nosuch", "prompt": "hi"})
        bad = client.post(ECHO, json={"prompt": "no model"})
        failed = client.post(ECHO, json={"model": "test/kit-fails", "stream": True})

    assert missing.status_code == 404
    assert "test/nosuch" in missing.json()["error"]["message"]
    assert bad.status_code == 400
    assert "'model'" in bad.json()["error"]["message"]
    assert failed.status_code == 500
    assert "no weights" in failed.json()["error"]["message"]
