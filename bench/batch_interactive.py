"""A chat batch through the Batch API while an interactive client chats: does the chat
stay fast, and does the batch alone run at the speed of a client's own requests?

    python bench/batch_interactive.py [--requests 500] [--max-tokens 16]
           [--chats 12] [--chat-max-tokens 48] [--concurrency 8] [--json results.json]

`dmr serve` runs on a temporary store with the SmolLM2 GGUF as `ai/smollm2`, default
settings. Everything goes through the official `openai` client, at `/engines/v1`:

1. `idle`: an interactive client streams `--chats` chats one after another on the
   otherwise idle server: TTFT of each, and its tokens/s (completion tokens after the
   first ÷ time from the first token to the last). Again after phase 4; the idle
   figures are of both together, and the two phases' TTFT p50 are printed: far apart,
   the machine was not quiet and the run says nothing.
2. `batch alone`: a JSONL file of `--requests` chat lines (`--max-tokens` each,
   temperature 0) is uploaded and run as a batch; tokens/s = completion tokens in the
   output file ÷ the time from `batches.create` to `completed`.
3. `client`: the same requests sent by a client at `--concurrency` (the runner's 8
   slots, as `DMR_BATCH_CONCURRENCY`): completion tokens ÷ wall time.
4. `batch + chats`: the batch again; once it is in progress, the interactive client
   streams its `--chats` chats one after another, as in 1.

Every prompt starts with a new nonce per phase (and per chat), so no phase finds
another's prompts cached. Targets (issue 25, docs/batch.md "Interactive first"):
the chats' TTFT p50 during the batch <= 1.5 x idle, their tokens/s >= 0.8 x idle; the
batch alone >= 0.9 x the client's tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from dmr_served import dmr_served
from openai import AsyncOpenAI

MODEL = "ai/smollm2"
QUESTIONS = [
    "Name a fruit that is yellow.",
    "What is the capital of France?",
    "Give me a word that rhymes with cat.",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "Name an animal that lives in the sea.",
    "What do bees make?",
    "Which planet is closest to the sun?",
]
CHAT_QUESTIONS = [
    "Write a short paragraph about the moon.",
    "Describe a walk in a forest in autumn.",
    "Explain how a bicycle works.",
    "Tell me a short story about a lighthouse.",
]
TERMINAL = {"completed", "failed", "expired", "cancelled"}


@dataclass
class Chats:
    ttft_ms: list[float]
    tokens_per_s: list[float]

    @property
    def ttft_p50_ms(self) -> float:
        return statistics.median(self.ttft_ms)

    @property
    def tokens_per_s_p50(self) -> float:
        return statistics.median(self.tokens_per_s)


@dataclass
class Throughput:
    requests: int
    completion_tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s


def _bodies(count: int, max_tokens: int) -> list[dict[str, Any]]:
    nonce = uuid.uuid4().hex
    return [
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": f"Run {nonce}. Answer in a few words."},
                {"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]},
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for index in range(count)
    ]


async def chat_one_after_another(
    client: AsyncOpenAI, chats: int, max_tokens: int, until: asyncio.Event | None = None
) -> Chats:
    """Stream `chats` chats in turn (fewer if `until` is set first): TTFT and tokens/s."""
    result = Chats([], [])
    for index in range(chats):
        if until is not None and until.is_set():
            break
        question = CHAT_QUESTIONS[index % len(CHAT_QUESTIONS)]
        started = time.perf_counter()
        first = last = 0.0
        tokens = 0
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": f"Chat {uuid.uuid4().hex}."},
                {"role": "user", "content": question},
            ],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if not first:
            raise RuntimeError("a chat streamed no text")
        result.ttft_ms.append((first - started) * 1000)
        if tokens > 1 and last > first:
            result.tokens_per_s.append((tokens - 1) / (last - first))
    return result


async def run_batch(
    client: AsyncOpenAI, bodies: list[dict[str, Any]], started_event: asyncio.Event | None = None
) -> Throughput:
    """Upload `bodies` as a batch, run it to its end: its completion tokens and wall time."""
    lines = [
        {
            "custom_id": f"line-{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": body,
        }
        for index, body in enumerate(bodies)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = await client.files.create(file=("batch.jsonl", data), purpose="batch")
    started = time.perf_counter()
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status not in TERMINAL:
        counts = batch.request_counts
        if started_event is not None and counts is not None and counts.completed >= 8:
            started_event.set()  # the runner's slots are full of batch lines by now
        await asyncio.sleep(0.2)
        batch = await client.batches.retrieve(batch.id)
    wall = time.perf_counter() - started
    if batch.status != "completed" or batch.output_file_id is None:
        raise RuntimeError(f"the batch ended {batch.status}: {batch.errors}")
    output = (await client.files.content(batch.output_file_id)).text
    tokens = 0
    answered = 0
    for line in output.splitlines():
        record = json.loads(line)
        if record["response"]["status_code"] == 200:
            answered += 1
            tokens += record["response"]["body"]["usage"]["completion_tokens"]
    if answered != len(bodies):
        raise RuntimeError(f"{len(bodies) - answered} lines of the batch failed")
    return Throughput(answered, tokens, wall)


async def run_client(
    client: AsyncOpenAI, bodies: list[dict[str, Any]], concurrency: int
) -> Throughput:
    """The same requests sent by a client with `concurrency` in flight."""
    pending = list(reversed(bodies))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while pending:
            body = pending.pop()
            answer = await client.chat.completions.create(**body)
            assert answer.usage is not None
            tokens += answer.usage.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Throughput(len(bodies), tokens, time.perf_counter() - started)


async def preemptions(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    found = re.findall(r"^llamacpp:preemptions_total\{[^}]*\} ([0-9.e+-]+)$", text, re.MULTILINE)
    return sum(float(value) for value in found)


async def measure(args: argparse.Namespace, base: str) -> dict[str, Any]:
    client = AsyncOpenAI(base_url=f"{base}/engines/v1", api_key="unused", timeout=600)
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        await chat_one_after_another(client, 1, 4)  # loads the model
        print("idle chats ...", flush=True)
        idle_before = await chat_one_after_another(client, args.chats, args.chat_max_tokens)
        print("batch alone ...", flush=True)
        alone = await run_batch(client, _bodies(args.requests, args.max_tokens))
        print("client at full concurrency ...", flush=True)
        direct = await run_client(client, _bodies(args.requests, args.max_tokens), args.concurrency)
        print("batch + chats ...", flush=True)
        before = await preemptions(http)
        running = asyncio.Event()
        batch_task = asyncio.create_task(
            run_batch(client, _bodies(args.requests, args.max_tokens), running)
        )
        waiter = asyncio.create_task(running.wait())
        await asyncio.wait([waiter, batch_task], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        busy = await chat_one_after_another(client, args.chats, args.chat_max_tokens)
        chats_done_before_batch = not batch_task.done()
        mixed = await batch_task
        preempted = await preemptions(http) - before
        print("idle chats again ...", flush=True)
        idle_after = await chat_one_after_another(client, args.chats, args.chat_max_tokens)
    # Idle figures from before and after the batch phases together; phases far apart
    # mean the machine was not quiet (compare `idle_phases_p50_ms`).
    idle = Chats(
        idle_before.ttft_ms + idle_after.ttft_ms,
        idle_before.tokens_per_s + idle_after.tokens_per_s,
    )
    ttft_ratio = busy.ttft_p50_ms / idle.ttft_p50_ms
    rate_ratio = busy.tokens_per_s_p50 / idle.tokens_per_s_p50
    batch_ratio = alone.tokens_per_s / direct.tokens_per_s
    return {
        "idle_chats": {
            **asdict(idle),
            "ttft_p50_ms": idle.ttft_p50_ms,
            "tokens_per_s_p50": idle.tokens_per_s_p50,
        },
        "idle_phases_p50_ms": [idle_before.ttft_p50_ms, idle_after.ttft_p50_ms],
        "busy_chats": {
            **asdict(busy),
            "ttft_p50_ms": busy.ttft_p50_ms,
            "tokens_per_s_p50": busy.tokens_per_s_p50,
        },
        "chats_all_during_batch": chats_done_before_batch,
        "batch_alone": {**asdict(alone), "tokens_per_s": alone.tokens_per_s},
        "client": {**asdict(direct), "tokens_per_s": direct.tokens_per_s},
        "batch_with_chats": {**asdict(mixed), "tokens_per_s": mixed.tokens_per_s},
        "preemptions": preempted,
        "ttft_ratio": ttft_ratio,
        "tokens_per_s_ratio": rate_ratio,
        "batch_ratio": batch_ratio,
        "targets_met": {
            "ttft_p50 <= 1.5x idle": ttft_ratio <= 1.5,
            "tokens/s >= 0.8x idle": rate_ratio >= 0.8,
            "batch >= 0.9x client": batch_ratio >= 0.9,
        },
    }


def _store_model(models_path: Path, gguf: Path) -> None:
    from dmr.distribution.packaging import PackageOptions, package_gguf, write_to_store
    from dmr.store import Store

    store = Store.open(models_path)
    write_to_store(store, package_gguf([gguf], PackageOptions()), [MODEL])


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dmr-bench-batch-") as name:
        folder = Path(name)
        _store_model(folder / "models", args.gguf)
        async with dmr_served(folder) as base:
            return await measure(args, base)


def main() -> None:
    from dmr.sample_model import ensure_smollm2_gguf

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=500, help="lines in the batch")
    parser.add_argument("--max-tokens", type=int, default=16, help="per batch line")
    parser.add_argument("--chats", type=int, default=12, help="interactive chats per phase")
    parser.add_argument("--chat-max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8, help="the client's requests")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.gguf = args.gguf or ensure_smollm2_gguf()
    results = asyncio.run(main_async(args))
    idle, busy = results["idle_chats"], results["busy_chats"]
    before, after = results["idle_phases_p50_ms"]
    print(f"idle TTFT p50 before the batches {before:.0f} ms, after {after:.0f} ms")
    if max(before, after) > 1.5 * min(before, after):
        print("the idle phases differ by more than 1.5x: the machine was not quiet")
    print(
        f"chats idle: TTFT p50 {idle['ttft_p50_ms']:.0f} ms, {idle['tokens_per_s_p50']:.1f} "
        f"tok/s; during the batch: {busy['ttft_p50_ms']:.0f} ms "
        f"({results['ttft_ratio']:.2f}x), {busy['tokens_per_s_p50']:.1f} tok/s "
        f"({results['tokens_per_s_ratio']:.2f}x); preemptions {results['preemptions']:.0f}"
    )
    print(
        f"batch alone {results['batch_alone']['tokens_per_s']:.1f} tok/s, client "
        f"{results['client']['tokens_per_s']:.1f} tok/s ({results['batch_ratio']:.2f}x); "
        f"batch with chats {results['batch_with_chats']['tokens_per_s']:.1f} tok/s"
    )
    for target, met in results["targets_met"].items():
        print(f"{target}: {'met' if met else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
