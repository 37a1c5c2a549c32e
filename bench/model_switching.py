"""Two models taking turns in a memory budget that holds one: how long requests
wait for memory, and how often the scheduler switches models.

    python bench/model_switching.py [--rounds 6] [--lone-requests 3]
           [--fair-wait 3] [--max-tokens 48] [--json results.json]

`dmr serve` runs with `DMR_MEMORY_BUDGET` set so that one SmolLM2 runner fits, and
two models in its store (the SmolLM2 GGUF packaged twice, two model IDs). First it
calibrates, in this run:

- one switch: the server's mean time from a runner's admission to its readiness
  (`dmr_runner_switch_seconds`: the evicted runner's stop, then the load) over a
  first load and three switches between idle models;
- one request's service time: the median latency of 8 concurrent requests for one
  loaded model (the load the scenarios put on it).

Then two scenarios:

- `alternating`: 8 clients, each asks the two models in turn, `--rounds` each;
- `lone`: 7 clients keep the first model busy while one client asks the second,
  `--lone-requests` times, one after the other.

For each: the wait for memory of every request (the scheduler's own log line for a
request that queued, 0 for one admitted at once): p50, p99 and max; the number of
switches (runner loads) and of forced switches (a request owed its turn holding
others back); and the checks of docs/scheduler.md: every request answered 200 and
no wait longer than 2 x (one switch + one service time), and no more forced
switches than one per `--fair-wait` seconds of the scenario, plus one (a switch
because the loaded model went idle is not limited: nothing waits for it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from dmr_served import dmr_served

MODELS = ("ai/smollm2", "ai/smollm2-other")
CHAT = "/engines/v1/chat/completions"
# Admitted after a wait, or refused at the queue deadline (a 503).
WAITED = re.compile(r"(\S+) (?:waited|gave up after) ([0-9.]+)s(?: waiting)? for memory")


@dataclass
class Scenario:
    name: str
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    waits: list[float] = field(default_factory=list)
    switches: int = 0
    forced: int = 0
    seconds: float = 0.0

    def figures(self, bound: float, fair_wait: float) -> dict[str, Any]:
        # Requests admitted at once waited 0 s; the log names only those that queued.
        waits = self.waits + [0.0] * max(self.requests - len(self.waits), 0)
        allowed = math.floor(self.seconds / fair_wait) + 1
        longest = max(waits, default=0.0)
        return {
            "scenario": self.name,
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "queued": len(self.waits),
            "wait_p50_s": round(_percentile(waits, 50), 2),
            "wait_p99_s": round(_percentile(waits, 99), 2),
            "wait_max_s": round(longest, 2),
            "switches": self.switches,
            "forced_switches": self.forced,
            "forced_allowed": allowed,
            "seconds": round(self.seconds, 1),
            "wait_bound_s": round(bound, 2),
            "bound_met": longest <= bound and set(self.statuses) == {200},
            "switches_met": self.forced <= allowed,
        }


def _percentile(values: list[float], percent: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def _store_two_models(models_path: Path, gguf: Path) -> None:
    from dmr.distribution.packaging import PackageOptions, package_gguf, write_to_store
    from dmr.store import Store

    store = Store.open(models_path)
    for tag, created in zip(MODELS, ("2024-11-01T00:00:00Z", "2024-11-02T00:00:00Z"), strict=True):
        write_to_store(store, package_gguf([gguf], PackageOptions(created=created)), [tag])


class Bench:
    def __init__(self, client: httpx.AsyncClient, log_path: Path, max_tokens: int) -> None:
        self.client = client
        self.log_path = log_path
        self.max_tokens = max_tokens

    async def ask(self, model: str, scenario: Scenario | None = None) -> float:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Count to twenty."}],
            "max_tokens": self.max_tokens,
        }
        started = time.monotonic()
        answer = await self.client.post(CHAT, json=body)
        seconds = time.monotonic() - started
        if scenario is not None:
            scenario.requests += 1
            scenario.statuses[answer.status_code] = scenario.statuses.get(answer.status_code, 0) + 1
        elif answer.status_code != 200:
            raise RuntimeError(f"{model}: {answer.status_code} {answer.text}")
        return seconds

    async def counts(self) -> tuple[int, int]:
        """Runner loads, and turns owed that held requests back (forced switches)."""
        text = (await self.client.get("/metrics")).text
        loads = re.search(r"^dmr_runner_loads_total ([0-9.e+]+)$", text, re.MULTILINE)
        owed = re.search(
            r'^dmr_scheduler_events_total\{event="turns_owed"\} ([0-9.e+]+)$', text, re.MULTILINE
        )
        return (
            int(float(loads.group(1))) if loads else 0,
            int(float(owed.group(1))) if owed else 0,
        )

    async def mean_switch(self) -> float:
        """The server's own mean admission-to-ready time of its loads so far."""
        text = (await self.client.get("/metrics")).text
        sums = re.search(r"^dmr_runner_switch_seconds_sum ([0-9.e+]+)$", text, re.MULTILINE)
        counts = re.search(r"^dmr_runner_switch_seconds_count ([0-9.e+]+)$", text, re.MULTILINE)
        if not sums or not counts:
            raise RuntimeError("the server reports no dmr_runner_switch_seconds")
        return float(sums.group(1)) / float(counts.group(1))

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def waits_since(self, offset: int) -> list[float]:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        return [float(match.group(2)) for match in WAITED.finditer(text)]

    async def measured(self, scenario: Scenario, work: Any) -> Scenario:
        offset, (loads, owed), started = self.log_offset(), await self.counts(), time.monotonic()
        await work
        scenario.seconds = time.monotonic() - started
        await asyncio.sleep(0.5)  # the log lines of the last admissions
        scenario.waits = self.waits_since(offset)
        loads_after, owed_after = await self.counts()
        scenario.switches, scenario.forced = loads_after - loads, owed_after - owed
        return scenario


async def run(args: argparse.Namespace, bench: Bench) -> list[dict[str, Any]]:
    first, second = MODELS
    for model in (first, second, first, second):  # a load, then three switches
        await bench.ask(model)
    switch = await bench.mean_switch()
    service = statistics.median(await asyncio.gather(*(bench.ask(second) for _ in range(8))))
    bound = 2 * (max(switch, 0.0) + service)
    print(f"calibration: one switch {switch:.2f}s, one service time {service:.2f}s "
          f"(8 concurrent), bound {bound:.2f}s", flush=True)  # fmt: skip

    async def alternating(scenario: Scenario) -> None:
        async def client(index: int) -> None:
            for turn in range(args.rounds):
                await bench.ask(MODELS[(index + turn) % 2], scenario)

        await asyncio.gather(*(client(index) for index in range(8)))

    async def lone(scenario: Scenario) -> None:
        stop = asyncio.Event()

        async def busy() -> None:
            while not stop.is_set():
                await bench.ask(first, scenario)

        clients = [asyncio.create_task(busy()) for _ in range(7)]
        await asyncio.sleep(2.0)
        for _ in range(args.lone_requests):
            await bench.ask(second, scenario)
            await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*clients)

    results = []
    for name, work in (("alternating", alternating), ("lone", lone)):
        scenario = Scenario(name)
        await bench.measured(scenario, work(scenario))
        figures = scenario.figures(bound, args.fair_wait)
        figures.update(switch_s=round(switch, 2), service_s=round(service, 2))
        print(json.dumps(figures), flush=True)
        results.append(figures)
    return results


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="dmr-bench-switching-") as name:
        folder = Path(name)
        _store_two_models(folder / "models", args.gguf)
        served = dmr_served(
            folder,
            DMR_MEMORY_BUDGET=str(args.budget),
            DMR_FAIR_WAIT_SECONDS=str(args.fair_wait),
        )
        async with served as base, httpx.AsyncClient(base_url=base, timeout=600) as client:
            return await run(args, Bench(client, folder / "server.log", args.max_tokens))


def main() -> None:
    from dmr.sample_model import ensure_smollm2_gguf

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=6, help="turns per alternating client")
    parser.add_argument("--lone-requests", type=int, default=3)
    parser.add_argument("--fair-wait", type=float, default=3.0, help="DMR_FAIR_WAIT_SECONDS")
    parser.add_argument("--budget", type=int, default=2 * 1024**3, help="bytes: one runner")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.gguf = args.gguf or ensure_smollm2_gguf()
    results = asyncio.run(main_async(args))
    failed = [r["scenario"] for r in results if not (r["bound_met"] and r["switches_met"])]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print("all checks met" if not failed else f"checks missed in: {', '.join(failed)}")


if __name__ == "__main__":
    main()
