"""`GET /metrics` on a live server: its own series and its runners', merged with labels."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import add_test_model, chat_body

CHAT = "/engines/v1/chat/completions"


def scrape(server: DmrServer) -> list[Sample]:
    with server.client() as client:
        answer = client.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return [
        sample
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    ]


def find(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [
        s
        for s in samples
        if s.name == name and all(s.labels.get(key) == value for key, value in labels.items())
    ]


def test_two_runners_are_merged_with_labels_and_requests_are_counted(
    test_engine_server: DmrServer,
) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "test/one")
    add_test_model(server.models_path, "test/two")
    with server.client() as client:
        for model in ("test/one", "test/two"):
            assert client.post(CHAT, json=chat_body(model, "hi")).status_code == 200
        with client.stream("POST", CHAT, json=chat_body("test/one", "a b c", stream=True)) as sse:
            assert sse.status_code == 200
            sse.read()
        assert client.post(CHAT, json=chat_body("test/missing")).status_code == 404

    samples = scrape(server)

    # Each runner's own series, labelled with the runner it came from.
    for model, served in (("test/one", 2.0), ("test/two", 1.0)):
        [sample] = find(
            samples,
            "testengine_requests_total",
            backend="test-engine",
            model=model,
            mode="completion",
        )
        assert sample.value == served
    # The server's own counters moved with the requests above.
    ok = find(samples, "dmr_requests_total", route=CHAT, model="test/one", dialect="openai")
    assert [s.labels["status"] for s in ok] == ["200"] and ok[0].value == 2
    assert find(samples, "dmr_requests_total", route=CHAT, status="404")
    [prompt] = find(samples, "dmr_prompt_tokens_total", model="test/two")
    assert prompt.value == 1
    [generated] = find(samples, "dmr_generated_tokens_total", model="test/one")
    assert generated.value >= 1
    [ttft] = find(samples, "dmr_time_to_first_token_seconds_count", model="test/one")
    assert ttft.value == 1  # only the streamed request has a first token apart
    [latency] = find(samples, "dmr_request_duration_seconds_count", route=CHAT, model="test/two")
    assert latency.value == 1
    [idle] = find(samples, "dmr_runners_loaded", backend="test-engine", state="idle")
    assert idle.value == 2
    memory = find(samples, "dmr_runner_memory_bytes", backend="test-engine", mode="completion")
    assert {s.labels["model"] for s in memory} == {"test/one", "test/two"}
    assert all(s.value > 0 for s in memory)
    [loads] = find(samples, "dmr_runner_loads_total")
    assert loads.value == 2
    assert find(samples, "dmr_queue_depth")[0].value == 0
    assert find(samples, "dmr_runner_crashes_total")[0].value == 0
    assert find(samples, "dmr_pull_bytes_total")[0].value == 0


def test_a_crashed_runner_is_counted_and_left_out(test_engine_server: DmrServer) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "test/crashy")
    with server.client() as client:
        assert client.post(CHAT, json=chat_body("test/crashy")).status_code == 200
        crashed = client.post(CHAT, json=chat_body("test/crashy", test={"crash": "boom"}))
        assert crashed.status_code == 500

    samples = scrape(server)

    assert find(samples, "dmr_runner_crashes_total")[0].value == 1
    assert not find(samples, "testengine_requests_total", model="test/crashy")


def test_a_runner_slow_to_answer_is_skipped(test_engine_server: DmrServer) -> None:
    server = test_engine_server
    add_test_model(server.models_path, "test/quick")
    add_test_model(server.models_path, "test/sluggish", metrics_sleep=8.0)
    with server.client() as client:
        for model in ("test/quick", "test/sluggish"):
            assert client.post(CHAT, json=chat_body(model)).status_code == 200

    started = time.monotonic()
    samples = scrape(server)

    assert time.monotonic() - started < 6  # the runner's short timeout, not its 8 s
    assert find(samples, "testengine_requests_total", model="test/quick")
    assert not find(samples, "testengine_requests_total", model="test/sluggish")
    assert find(samples, "dmr_runner_memory_bytes", model="test/sluggish")


def test_disable_metrics_turns_the_route_off(
    dmr_server_factory: Callable[..., DmrServer],
) -> None:
    server = dmr_server_factory(DISABLE_METRICS="1")
    with server.client() as client:
        assert client.get("/metrics").status_code == 404
        assert client.get("/").status_code == 200


@pytest.mark.timeout(600)
def test_llamacpp_runners_in_two_modes_are_merged(smollm2_server: DmrServer) -> None:
    server = smollm2_server
    # The session server is shared with other tests: compare against a first scrape.
    before = find(scrape(server), "dmr_generated_tokens_total", model="ai/smollm2")
    generated_before = before[0].value if before else 0.0
    with server.client(timeout=300) as client:
        chat = client.post(
            CHAT,
            json={
                "model": "ai/smollm2",
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 4,
            },
        )
        assert chat.status_code == 200, chat.text
        embed = client.post(
            "/engines/v1/embeddings", json={"model": "ai/smollm2", "input": "hello"}
        )
        assert embed.status_code == 200, embed.text

    samples = scrape(server)

    for mode in ("completion", "embedding"):
        series = find(samples, "llamacpp:prompt_tokens_total", backend="llama.cpp", mode=mode)
        assert len(series) == 1, samples
        assert series[0].labels["model"] == "ai/smollm2"
    [completion] = find(samples, "llamacpp:tokens_predicted_total", mode="completion")
    assert completion.value >= 1
    assert find(samples, "llamacpp:kv_cache_usage_ratio", mode="completion")
    [generated] = find(samples, "dmr_generated_tokens_total", model="ai/smollm2")
    assert 1 <= generated.value - generated_before <= 4
