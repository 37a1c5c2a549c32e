"""Load: 64 concurrent clients against a live server with two SmolLM2 models.

Nothing may be lost, truncated or answered with a 5xx; every stream ends with
`[DONE]`; the server's own memory stays flat while the load runs. Past the
admission queue the answer is 503 with `Retry-After`, never a hang; under a
budget that fits one model at a time, alternating clients are all answered and
the evictions show in `/metrics`.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import DmrServer, start_server
from tests.reliability.figures import record
from tests.reliability.live import MIB, RssSampler, metric, put_smollm2

pytestmark = [pytest.mark.llama, pytest.mark.slow]

MODELS = ("ai/smollm2", "ai/smollm2-other")
CLIENTS = 64
LOAD_SECONDS = 20.0
# A request slower than this is a hang. Queued behind 63 others on 2 shared cores a
# request can take a minute (measured p50 ~25 s, max ~88 s with 4-16 tokens).
REQUEST_TIMEOUT = 180.0
CHAT = "/engines/v1/chat/completions"
REJECTED_BUSY = 'dmr_scheduler_events_total{event="rejected_busy"}'


@pytest.fixture(scope="module")
def two_model_server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> Iterator[DmrServer]:
    tmp = tmp_path_factory.mktemp("reliability-load")
    put_smollm2(tmp / "models", smollm2_gguf, MODELS[0], "2024-11-01T00:00:00Z")
    put_smollm2(tmp / "models", smollm2_gguf, MODELS[1], "2024-11-02T00:00:00Z")
    server = start_server(tmp)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def fail(self, what: str) -> None:
        self.outcomes["failed"] += 1
        if len(self.problems) < 20:
            self.problems.append(what)


def chat_body(rng: random.Random, model: str, stream: bool) -> dict[str, object]:
    topic = rng.choice(["the sea", "a cat", "containers", "rain", "bread", "the moon"])
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Say one sentence about {topic}."}],
        "max_tokens": rng.randint(2, 8),
        "stream": stream,
    }


async def chat(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    model = rng.choice(MODELS)
    answer = await client.post(CHAT, json=chat_body(rng, model, stream=False))
    tally.statuses[answer.status_code] += 1
    if answer.status_code != 200:
        tally.fail(f"chat {answer.status_code}: {answer.text[:200]}")
        return
    body = answer.json()  # a truncated body does not parse
    choice = body["choices"][0]
    if choice.get("finish_reason") not in ("stop", "length") or "content" not in choice["message"]:
        tally.fail(f"chat answer incomplete: {body}")
        return
    tally.outcomes["chat"] += 1


async def chat_stream(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    model = rng.choice(MODELS)
    async with client.stream("POST", CHAT, json=chat_body(rng, model, stream=True)) as answer:
        tally.statuses[answer.status_code] += 1
        if answer.status_code != 200:
            tally.fail(f"stream {answer.status_code}: {(await answer.aread())[:200]!r}")
            return
        events = [line async for line in answer.aiter_lines() if line.startswith("data: ")]
    if not events:
        tally.fail("stream without events")
    elif events[-1] == "data: [DONE]":
        tally.outcomes["stream"] += 1
    elif "error" in json.loads(events[-1][6:]):
        tally.outcomes["stream_error"] += 1  # a proper error, but none is expected here
        tally.fail(f"stream ended with an error: {events[-1]}")
    else:
        tally.fail(f"stream truncated after {len(events)} events: {events[-1][:200]}")


async def embed(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    texts = [f"sentence number {rng.randint(0, 999)}" for _ in range(rng.randint(1, 3))]
    answer = await client.post("/engines/v1/embeddings", json={"model": MODELS[0], "input": texts})
    tally.statuses[answer.status_code] += 1
    if answer.status_code != 200:
        tally.fail(f"embeddings {answer.status_code}: {answer.text[:200]}")
        return
    data = answer.json()["data"]
    if len(data) != len(texts) or not all(len(item["embedding"]) > 0 for item in data):
        tally.fail("embeddings answer incomplete")
        return
    tally.outcomes["embeddings"] += 1


async def list_models(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    path = rng.choice(["/engines/v1/models", "/models", "/api/tags"])
    answer = await client.get(path)
    tally.statuses[answer.status_code] += 1
    text = answer.text
    if answer.status_code != 200 or not all(model in text for model in MODELS):
        tally.fail(f"{path} {answer.status_code}: {text[:200]}")
        return
    tally.outcomes["listing"] += 1


Operation = Callable[[httpx.AsyncClient, random.Random, Tally], object]
# Weights: chat and streams dominate, as they do in use.
OPERATIONS: list[tuple[Operation, int]] = [
    (chat, 3),
    (chat_stream, 3),
    (embed, 2),
    (list_models, 2),
]


async def one_client(server: DmrServer, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    operations = [op for op, weight in OPERATIONS for _ in range(weight)]
    async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT) as client:
        while time.monotonic() < deadline:
            operation = rng.choice(operations)
            started = time.monotonic()
            try:
                await operation(client, rng, tally)  # type: ignore[misc]
            except httpx.TimeoutException:
                tally.outcomes["hung"] += 1
                tally.fail(f"{operation.__name__} timed out")  # type: ignore[attr-defined]
            except (httpx.HTTPError, ValueError, KeyError) as error:
                tally.outcomes["lost"] += 1
                tally.fail(f"{operation.__name__}: {error!r}")  # type: ignore[attr-defined]
            name = operation.__name__  # type: ignore[attr-defined]
            tally.latencies.setdefault(name, []).append(time.monotonic() - started)


async def warm_up(server: DmrServer) -> None:
    """Load the three runners first: the load phase measures serving, not loading."""
    async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT) as client:
        rng = random.Random(0)
        tally = Tally()
        await asyncio.gather(*(chat(client, rng, tally) for _ in MODELS), embed(client, rng, tally))
        assert not tally.problems, tally.problems


def test_64_clients_lose_nothing_and_memory_stays_flat(two_model_server: DmrServer) -> None:
    server = two_model_server
    asyncio.run(warm_up(server))
    tally = Tally()
    with RssSampler(server.process.pid) as rss:
        started = time.monotonic()
        deadline = started + LOAD_SECONDS

        async def run() -> None:
            await asyncio.gather(
                *(one_client(server, seed, deadline, tally) for seed in range(CLIENTS))
            )

        asyncio.run(run())
        finished = time.monotonic()
        time.sleep(1)  # one more sample once the load has gone
    third = (finished - started) / 3
    early = rss.median_between(started, started + third)
    late = rss.median_between(finished - third, finished)
    total = sum(tally.statuses.values())
    latency = {
        name: f"p50 {statistics.median(values):.2f} s, max {max(values):.2f} s"
        for name, values in sorted(tally.latencies.items())
    }
    record(
        "load_64_clients",
        clients=CLIENTS,
        issuing_seconds=LOAD_SECONDS,
        seconds_until_all_answered=round(finished - started, 1),
        requests=total,
        outcomes=dict(tally.outcomes),
        statuses={str(k): v for k, v in tally.statuses.items()},
        latency=latency,
        server_rss_early_mib=round(early / MIB, 1),
        server_rss_late_mib=round(late / MIB, 1),
        server_rss_peak_mib=round(rss.peak / MIB, 1),
    )
    assert not tally.problems, tally.problems
    assert tally.outcomes["lost"] == tally.outcomes["hung"] == 0
    assert not [status for status in tally.statuses if status >= 500]
    assert total >= CLIENTS  # every client got answers, not just a few
    for kind in ("chat", "stream", "embeddings", "listing"):
        assert tally.outcomes[kind] > 0, kind
    # Flat: the second third of the run holds no more than the first, give or
    # take allocator noise; a leak per request would show as steady growth.
    assert late - early < 32 * MIB, (early, late)
    # The server survived and is idle again: nothing left in use.
    ps = httpx.get(server.url + "/engines/ps", timeout=30).json()
    assert len(ps) == 3 and not any(runner["in_use"] for runner in ps)


async def _ask(client: httpx.AsyncClient, model: str) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Count to twenty."}],
        "max_tokens": 48,
    }
    return await client.post(CHAT, json=body)


async def _until_busy(client: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(runner["in_use"] for runner in (await client.get("/engines/ps")).json()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the first model's runner never became busy")


@pytest.mark.serial
def test_a_lone_client_of_the_second_model_gets_its_turn_within_the_bound(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    """Budget for one runner; seven clients keep the first model busy and one asks the
    second. The lone request is answered within fair wait + 2 x (one switch + one
    request's service time), both measured in this run (docs/scheduler.md); its wait
    for memory alone is at most the fair wait plus the drain of the first model's
    requests, one service time, with as much again for the noise of a shared machine."""
    put_smollm2(tmp_path / "models", smollm2_gguf, MODELS[0], "2024-11-01T00:00:00Z")
    put_smollm2(tmp_path / "models", smollm2_gguf, MODELS[1], "2024-11-02T00:00:00Z")
    fair_wait = 3.0
    server = start_server(
        tmp_path,
        {"DMR_MEMORY_BUDGET": str(2 * 1024**3), "DMR_FAIR_WAIT_SECONDS": str(fair_wait)},
    )
    try:

        async def run() -> tuple[httpx.Response, float, list[float], list[int]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT) as client:
                assert (await _ask(client, MODELS[0])).status_code == 200
                stop = asyncio.Event()
                services: list[float] = []
                statuses: list[int] = []

                async def busy() -> None:
                    while not stop.is_set():
                        began = time.monotonic()
                        answer = await _ask(client, MODELS[0])
                        statuses.append(answer.status_code)
                        services.append(time.monotonic() - began)

                clients = [asyncio.create_task(busy()) for _ in range(7)]
                await _until_busy(client)
                await asyncio.sleep(2.0)  # seven streams in full swing
                began = time.monotonic()
                lone = await _ask(client, MODELS[1])
                lone_seconds = time.monotonic() - began
                stop.set()
                await asyncio.gather(*clients)
                return lone, lone_seconds, services, statuses

        lone, lone_seconds, services, statuses = asyncio.run(run())
        # One switch, as the server measured this run's: from a runner's admission to
        # its readiness, the evicted runner's stop included (the mean of the three
        # loads). One request's service time under the same load: the median of the
        # busy clients' requests.
        switch = metric(server, "dmr_runner_switch_seconds_sum") / metric(
            server, "dmr_runner_switch_seconds_count"
        )
        service = statistics.median(services)
        lone_wait = metric(server, 'dmr_queue_wait_seconds_sum{model="ai/smollm2-other"}')
        bound = fair_wait + 2 * (switch + service)
        record(
            "lone_client_turn",
            lone_seconds=round(lone_seconds, 2),
            lone_wait_for_memory_seconds=round(lone_wait, 2),
            bound_seconds=round(bound, 2),
            service_p50_seconds=round(service, 2),
            switch_seconds=round(switch, 2),
            evictions=metric(server, "dmr_runner_evictions_total"),
        )
        assert lone.status_code == 200, lone.text
        assert lone_seconds <= bound, f"{lone_seconds:.1f}s > bound {bound:.1f}s"
        assert lone_wait <= fair_wait + 2 * service, f"waited {lone_wait:.1f}s for memory"
        assert set(statuses) == {200}
    finally:
        server.stop()


def test_full_queue_answers_503_with_retry_after(tmp_path: Path, smollm2_gguf: Path) -> None:
    """One runner fits the budget; with it busy, requests for the other model wait in
    a queue of 2 and the rest are refused at once with 503 + Retry-After."""
    put_smollm2(tmp_path / "models", smollm2_gguf, MODELS[0], "2024-11-01T00:00:00Z")
    put_smollm2(tmp_path / "models", smollm2_gguf, MODELS[1], "2024-11-02T00:00:00Z")
    server = start_server(tmp_path, {"DMR_MEMORY_BUDGET": str(2 * 1024**3), "DMR_MAX_QUEUE": "2"})
    try:

        async def run() -> list[httpx.Response | BaseException]:
            async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT) as client:
                assert (await _ask(client, MODELS[0])).status_code == 200  # loaded, now idle
                busy = [asyncio.create_task(_ask(client, MODELS[0])) for _ in range(4)]
                await _until_busy(client)  # the first model's runner holds the budget
                others = [asyncio.create_task(_ask(client, MODELS[1])) for _ in range(8)]
                answers = await asyncio.gather(*busy, *others, return_exceptions=True)
                return answers

        started = time.monotonic()
        answers = asyncio.run(run())
        elapsed = time.monotonic() - started
        statuses = Counter(
            a.status_code if isinstance(a, httpx.Response) else type(a).__name__ for a in answers
        )
        refused = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 503]
        record(
            "queue_overflow_503",
            budget_bytes=2 * 1024**3,
            max_queue=2,
            requests=len(answers),
            statuses={str(k): v for k, v in statuses.items()},
            seconds=round(elapsed, 1),
            rejected_busy_metric=metric(server, REJECTED_BUSY, 0),
        )
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[503] >= 1 and statuses[200] >= 6
        for answer in refused:
            assert int(answer.headers["Retry-After"]) > 0
            assert answer.json()["error"]["message"]
    finally:
        server.stop()


def test_two_models_over_budget_alternate_without_losing_requests(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    """Budget for one runner; 8 clients alternate between two models. Every request
    is answered (they queue for memory), the server never runs out of memory, and
    each switch is an eviction counted in /metrics."""
    put_smollm2(tmp_path / "models", smollm2_gguf, MODELS[0], "2024-11-01T00:00:00Z")
    put_smollm2(tmp_path / "models", smollm2_gguf, MODELS[1], "2024-11-02T00:00:00Z")
    server = start_server(tmp_path, {"DMR_MEMORY_BUDGET": str(2 * 1024**3)})
    clients, rounds = 8, 6
    try:

        async def client_loop(index: int) -> list[int]:
            statuses = []
            async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT) as client:
                for turn in range(rounds):
                    answer = await _ask(client, MODELS[(index + turn) % 2])
                    statuses.append(answer.status_code)
            return statuses

        async def run() -> list[list[int]]:
            return await asyncio.gather(*(client_loop(i) for i in range(clients)))

        started = time.monotonic()
        with RssSampler(server.process.pid) as rss:
            results = asyncio.run(run())
        elapsed = time.monotonic() - started
        statuses = Counter(status for result in results for status in result)
        evictions = metric(server, "dmr_runner_evictions_total")
        crashes = metric(server, "dmr_runner_crashes_total")
        record(
            "two_models_over_budget",
            budget_bytes=2 * 1024**3,
            clients=clients,
            requests=clients * rounds,
            statuses={str(k): v for k, v in statuses.items()},
            evictions=evictions,
            loads=metric(server, "dmr_runner_loads_total"),
            crashes=crashes,
            seconds=round(elapsed, 1),
            server_rss_peak_mib=round(rss.peak / MIB, 1),
        )
        assert statuses == Counter({200: clients * rounds})
        assert evictions >= 1 and crashes == 0
        ps = httpx.get(server.url + "/engines/ps", timeout=30).json()
        assert len(ps) == 1  # never both at once
        assert server.process.poll() is None
    finally:
        server.stop()
