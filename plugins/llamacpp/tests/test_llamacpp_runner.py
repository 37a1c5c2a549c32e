"""The runner worker over its unix socket, with the real SmolLM2 model."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from llamacpp_helpers import RunnerProcess

pytestmark = pytest.mark.llama

HELLO = [{"role": "user", "content": "Tell me a short story about a cat."}]


def sse_events(lines: list[str]) -> list[Any]:
    events: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, text
    return float(found.group(1))


def test_health_and_models(completion_runner: RunnerProcess) -> None:
    with completion_runner.client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "ai/smollm2:latest"


def test_chat_non_stream(completion_runner: RunnerProcess) -> None:
    with completion_runner.client() as client:
        body = client.post(
            "/v1/chat/completions",
            json={"messages": HELLO, "max_tokens": 12, "temperature": 0, "ignore_eos": True},
        ).json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 12
    timings = body["timings"]
    assert timings["predicted_n"] == 12
    # Decoded prompt tokens plus those reused from the slot's cache make the whole prompt.
    assert timings["prompt_n"] >= 1 and body["usage"]["prompt_tokens"] > 10
    assert timings["prompt_n"] + timings["cache_n"] == body["usage"]["prompt_tokens"]
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == timings["cache_n"]


def test_chat_stream_with_usage(completion_runner: RunnerProcess) -> None:
    request = {
        "messages": HELLO,
        "max_tokens": 10,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with (
        completion_runner.client() as client,
        client.stream("POST", "/v1/chat/completions", json=request) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(response.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(
        chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"]
    )
    assert text
    finish = [
        chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["finish_reason"]
    ]
    assert finish[-1]["choices"][0]["finish_reason"] == "length"
    assert finish[-1]["timings"]["predicted_n"] == 10
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    # The same request without streaming gives the same greedy text.
    with completion_runner.client() as client:
        whole = client.post("/v1/chat/completions", json={**request, "stream": False}).json()
    assert whole["choices"][0]["message"]["content"] == text


def test_completions_and_stop_sequences(completion_runner: RunnerProcess) -> None:
    request = {"prompt": "1, 2, 3, 4,", "max_tokens": 20, "temperature": 0}
    with completion_runner.client() as client:
        free = client.post("/v1/completions", json=request).json()
        assert free["object"] == "text_completion"
        assert " 7" in free["choices"][0]["text"]
        stopped = client.post("/v1/completions", json={**request, "stop": [" 7", "zzz"]}).json()
        with client.stream(
            "POST", "/v1/completions", json={**request, "stop": " 7", "stream": True}
        ) as r:
            events = sse_events(list(r.iter_lines()))
    text = stopped["choices"][0]["text"]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert free["choices"][0]["text"].startswith(text)
    assert " 7" not in text and text.rstrip().endswith("6,")
    streamed = "".join(event["choices"][0]["text"] for event in events[:-1] if event["choices"])
    assert streamed == text  # nothing of the stop string leaks into the stream


def test_seed_reproducibility(completion_runner: RunnerProcess) -> None:
    def sample(seed: int) -> str:
        with completion_runner.client() as client:
            body = client.post(
                "/v1/completions",
                json={
                    "prompt": "My favourite animal is",
                    "max_tokens": 24,
                    "temperature": 1.5,
                    "top_k": 0,
                    "top_p": 1.0,
                    "min_p": 0,
                    "seed": seed,
                    "ignore_eos": True,
                },
            ).json()
        return str(body["choices"][0]["text"])

    first, again, other = sample(1234), sample(1234), sample(98765)
    assert first == again
    assert first != other


def test_logprobs(completion_runner: RunnerProcess) -> None:
    with completion_runner.client() as client:
        chat = client.post(
            "/v1/chat/completions",
            json={
                "messages": HELLO,
                "max_tokens": 4,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 3,
                "ignore_eos": True,
            },
        ).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])


def test_json_schema_output(completion_runner: RunnerProcess) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    with completion_runner.client() as client:
        body = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Describe a person as JSON."}],
                "max_tokens": 80,
                "temperature": 0,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": schema},
                },
            },
        ).json()
    answer = json.loads(body["choices"][0]["message"]["content"])
    assert set(answer) == {"name", "age"}
    assert isinstance(answer["name"], str) and isinstance(answer["age"], int)


def test_tool_call(completion_runner: RunnerProcess) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    request = {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": tools,
        "tool_choice": "required",
        "max_tokens": 60,
        "temperature": 0,
    }
    with completion_runner.client() as client:
        body = client.post("/v1/chat/completions", json=request).json()
        with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as r:
            events = sse_events(list(r.iter_lines()))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    streamed = [
        e for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("tool_calls")
    ]
    assert streamed[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": HELLO, "n": 2}, "n"),
        ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {"messages": HELLO, "stop": 5}, "stop"),
        ("/v1/completions", {"prompt": 42}, "prompt"),
        ("/v1/embeddings", {"input": "x"}, None),
    ],
)
def test_bad_requests_get_openai_errors(
    completion_runner: RunnerProcess, path: str, body: dict[str, Any], param: str | None
) -> None:
    with completion_runner.client() as client:
        response = client.post(path, json=body)
        not_json = client.post(path, content=b"{nope")
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]


def test_tokenize_apply_template_metrics(completion_runner: RunnerProcess) -> None:
    with completion_runner.client() as client:
        tokens = client.post("/tokenize", json={"content": "Hello world"}).json()["tokens"]
        prompt = client.post("/apply-template", json={"messages": HELLO}).json()["prompt"]
        metrics = client.get("/metrics").text
    assert tokens and all(isinstance(token, int) for token in tokens)
    assert prompt.endswith("<|im_start|>assistant\n") and "cat" in prompt
    for name in (
        "llamacpp:prompt_tokens_total",
        "llamacpp:tokens_predicted_total",
        "llamacpp:prompt_tokens_seconds",
        "llamacpp:predicted_tokens_seconds",
        "llamacpp:kv_cache_usage_ratio",
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
    ):
        assert f"\n{name} " in metrics


async def test_eight_concurrent_streams_are_interleaved(completion_runner: RunnerProcess) -> None:
    max_tokens = 32
    started = time.perf_counter()

    async def one(client: httpx.AsyncClient, index: int) -> tuple[float, float, int, str]:
        request = {
            "messages": [{"role": "user", "content": f"Count to ten, attempt {index}."}],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "seed": index,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        first = 0.0
        text = ""
        usage = 0
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter() - started
                    text += event["choices"][0]["delta"]["content"]
        return first, time.perf_counter() - started, usage, text

    async with completion_runner.async_client() as client:
        results = await asyncio.gather(*(one(client, index) for index in range(8)))
    assert all(usage == max_tokens for _, _, usage, _ in results)
    assert all(text for *_, text in results)
    # Every stream had its first token before any stream finished: they ran together.
    assert max(first for first, *_ in results) < min(done for _, done, *_ in results)


async def test_requests_sent_together_share_their_first_step(burst_runner: RunnerProcess) -> None:
    """An idle runner waits a moment for the rest of a burst (`--burst-gap-ms`, 50 here so
    a loaded machine cannot split it): four prompts sent at once are decoded in one step,
    not the first alone and the rest a step later."""

    def steps() -> float:
        with burst_runner.client() as client:
            return metric(client, "llamacpp:decode_steps_total")

    before = steps()
    async with burst_runner.async_client() as client:
        answers = await asyncio.gather(
            *(
                client.post(
                    "/v1/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": f"Name a colour, {index}."}],
                        "max_tokens": 1,
                        "cache_prompt": False,
                    },
                )
                for index in range(4)
            )
        )
    assert all(answer.status_code == 200 for answer in answers)
    # One token each: the step that decodes the four prompts samples all four answers.
    assert steps() - before == 1


async def test_streams_beyond_the_slots_start_as_soon_as_slots_free(
    burst_runner: RunnerProcess,
) -> None:
    """Sixteen short requests on four slots run in four waves, each starting as soon
    as the one before ends. An idle runner with requests already waiting used to wait
    0.5 s for yet another before it took them, between every two waves (half the
    throughput at 32 streams on a GPU). Measured as the time the runner spent outside
    its decode steps (`llamacpp:step_seconds_total`), which a loaded machine stretches
    far less than the steps themselves."""

    async def one(client: httpx.AsyncClient, index: int) -> None:
        request = {
            "messages": [{"role": "user", "content": f"Name a colour, number {index}."}],
            "max_tokens": 4,
            "ignore_eos": True,
            "cache_prompt": False,
        }
        answer = await client.post("/v1/chat/completions", json=request)
        assert answer.status_code == 200, answer.text

    with burst_runner.client() as sync_client:
        stepped = metric(sync_client, "llamacpp:step_seconds_total")
    started = time.perf_counter()
    async with burst_runner.async_client() as client:
        await asyncio.gather(*(one(client, index) for index in range(16)))
    wall = time.perf_counter() - started
    with burst_runner.client() as sync_client:
        stepped = metric(sync_client, "llamacpp:step_seconds_total") - stepped
    # Three hand-overs between waves: 1.5 s outside any step where the runner idled.
    assert wall - stepped < 1.0, (wall, stepped)


def test_step_timings_split_decode_from_the_python_around_it(
    completion_runner: RunnerProcess,
) -> None:
    """`llamacpp:step_seconds_total` holds every step, `llamacpp:decode_seconds_total`
    the llama_decode inside them, and `llamacpp:batch_tokens_total` every token
    decoded: the figures scripts/gpu-check reads to say where a step's time goes."""
    with completion_runner.client() as client:
        names = ("step_seconds", "decode_seconds", "batch_tokens")
        before = {name: metric(client, f"llamacpp:{name}_total") for name in names}
        answer = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Count to twenty."}],
                "max_tokens": 24,
                "ignore_eos": True,
                "cache_prompt": False,
            },
        )
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        grown = {name: metric(client, f"llamacpp:{name}_total") - before[name] for name in names}
    # The last sampled token is never decoded: prompt + completion - 1 tokens went in.
    assert grown["batch_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert 0 < grown["decode_seconds"] < grown["step_seconds"]


async def test_disconnect_frees_the_slot(completion_runner: RunnerProcess) -> None:
    request = {
        "prompt": "Write a very long essay about the sea.",
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    async with completion_runner.async_client() as client:
        async with client.stream("POST", "/v1/completions", json=request) as response:
            received = 0
            async for line in response.aiter_lines():
                received += line.startswith("data: ")
                if received >= 3:
                    break
        with completion_runner.client() as sync_client:
            assert metric(sync_client, "llamacpp:requests_processing") >= 0
            deadline = time.monotonic() + 10
            while metric(sync_client, "llamacpp:requests_processing") > 0:
                assert time.monotonic() < deadline, "the slot was not freed"
                await asyncio.sleep(0.1)
            predicted = metric(sync_client, "llamacpp:tokens_predicted_total")
            await asyncio.sleep(0.5)
            assert metric(sync_client, "llamacpp:tokens_predicted_total") == predicted


def test_embeddings_normalised_and_batched(embedding_runner: RunnerProcess) -> None:
    inputs = ["The cat sat on the mat.", "A kitten rested on a rug.", "Stock prices fell sharply."]
    with embedding_runner.client() as client:
        batch = client.post("/v1/embeddings", json={"input": inputs}).json()
        single = client.post("/v1/embeddings", json={"input": inputs[0]}).json()
        refused = client.post("/v1/chat/completions", json={"messages": HELLO})
    assert batch["object"] == "list" and [d["index"] for d in batch["data"]] == [0, 1, 2]
    vectors = [item["embedding"] for item in batch["data"]]
    assert all(len(vector) == 576 for vector in vectors)
    for vector in vectors:
        assert sum(value * value for value in vector) == pytest.approx(1.0, abs=1e-4)
    assert single["data"][0]["embedding"] == pytest.approx(vectors[0], abs=1e-4)
    assert batch["usage"]["prompt_tokens"] > single["usage"]["prompt_tokens"] > 0
    assert refused.status_code == 400


def test_rerank_and_score_shapes(reranking_runner: RunnerProcess) -> None:
    documents = ["Paris is the capital of France.", "Bananas are yellow.", "France's capital city."]
    with reranking_runner.client() as client:
        ranked = client.post(
            "/v1/rerank",
            json={
                "query": "capital of France",
                "documents": documents,
                "top_n": 2,
                "return_documents": True,
            },
        ).json()
        scored = client.post(
            "/v1/score", json={"text_1": "capital of France", "text_2": documents}
        ).json()
        bad = client.post("/v1/rerank", json={"query": "q", "documents": []})
    results = ranked["results"]
    assert len(results) == 2
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    assert results[0]["document"]["text"] == documents[results[0]["index"]]
    assert [item["index"] for item in scored["data"]] == [0, 1, 2]
    assert all(item["object"] == "score" for item in scored["data"])
    by_index = {item["index"]: item["score"] for item in scored["data"]}
    assert by_index[results[0]["index"]] == pytest.approx(results[0]["relevance_score"])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "documents"


def test_streamed_bad_request_gets_the_openai_error(completion_runner: RunnerProcess) -> None:
    """Streamed requests skip Quart (runner/streaming.py); their errors keep the shape."""
    with completion_runner.client() as client:
        answer = client.post(
            "/v1/chat/completions", json={"messages": HELLO, "temperature": "hot", "stream": True}
        )
    assert answer.status_code == 400
    assert answer.json() == {
        "error": {
            "message": "'temperature' must be a number",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_a_decode_step_is_written_as_one_chunk(
    completion_runner: RunnerProcess, path: str
) -> None:
    """Each step's events for a stream go out in one HTTP chunk (one send here and one
    in `dmr serve`): a one-token answer is a single chunk, role and end included."""
    from dmr.scheduler.unix_http import open_request

    chat = path == "/v1/chat/completions"
    for max_tokens in (1, 6):
        request = {
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **({"messages": HELLO} if chat else {"prompt": "Once upon a time"}),
        }
        answer = await open_request(
            completion_runner.socket_path,
            "POST",
            path,
            json.dumps(request).encode(),
            {"content-type": "application/json"},
        )
        try:
            chunks = [chunk async for chunk in answer.iter_body() if chunk]
        finally:
            await answer.aclose()
        events = sse_events(b"".join(chunks).decode().splitlines())
        usage = events[-2]["usage"]
        assert usage["completion_tokens"] == max_tokens
        # One chunk per decode step at most (text held back for stop strings adds none).
        assert 1 <= len(chunks) <= max_tokens
        first, last = sse_events(chunks[0].decode().splitlines()), chunks[-1].decode()
        if chat:
            assert first[0]["choices"][0]["delta"]["role"] == "assistant"
        text_of = (
            (lambda e: e["choices"][0]["delta"].get("content"))
            if chat
            else (lambda e: e["choices"][0]["text"])
        )
        assert any(e != "[DONE]" and e["choices"] and text_of(e) for e in first)
        assert '"finish_reason": "length"' in last or '"finish_reason":"length"' in last
        assert last.endswith("data: [DONE]\n\n")
        if max_tokens == 1:
            assert len(chunks) == 1


def wakeups(pid: int) -> int:
    """How often the process's threads went to sleep so far (Linux's voluntary
    context switches): each time one had woken up."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        found = re.search(r"^voluntary_ctxt_switches:\s+(\d+)$", status.read_text(), re.M)
        total += int(found.group(1)) if found else 0
    return total


def test_an_idle_runner_sleeps_until_a_request_comes(completion_runner: RunnerProcess) -> None:
    """No thread of an idle runner wakes to look for work or for its parent. The
    decode thread woke every 0.5 s and the orphan check every second; after such an
    idle spell the first `llama_decode` took up to twice as long (docs/benchmarks.md,
    "The first step after an idle spell")."""
    with completion_runner.client() as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        )
        assert answer.status_code == 200
    time.sleep(1.0)  # the idle copy of the slot to host memory comes 50 ms after
    before = wakeups(completion_runner.process.pid)
    time.sleep(4.0)
    # Polling woke it 12 times in 4 s; one wake-up is left for a stray event.
    assert wakeups(completion_runner.process.pid) - before <= 1
