"""What a one-token decode step costs with the weights mapped from the file or in huge pages.

    python bench/weights_placement.py [--models smollm2,random-0.6b,random-gemma3]
           [--rounds 3] [--steps 150]

The measure behind a CPU runner's weights placement (docs/scheduler.md, "Weights in
huge pages"). Each round starts one child process per placement, in turns:

- `mmap`: the GGUF file mapped, as llama.cpp, llama-server and Docker Model Runner
  load it by default (page-cache pages, 4 KiB each);
- `read`: read into the process's own memory (llama.cpp's `--no-mmap`), 4 KiB pages;
- `huge-pages`: read into its own memory with glibc's `glibc.malloc.hugetlb=1`, which
  has the kernel back it with transparent huge pages: what dmr's CPU runners do.

A child loads the model with 8 slots of 4,096 cells (the runner's default), decodes
a short prompt, then `--steps` steps of one token (no Python around them but the
batch and the greedy pick), and prints the median step in ms and how much of its
memory is in huge pages. The figures are medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

PLACEMENTS = ("mmap", "read", "huge-pages")
PROMPT = "Tell me a long story about the sea, and about the ships that sail on it."


def child(gguf: Path, placement: str, steps: int) -> None:
    """One placement's steps, printed as JSON (runs in its own process)."""
    import llama_cpp
    from dmr_llamacpp.huge_pages import anon_huge_page_bytes
    from dmr_llamacpp.runner.model import Batch, ContextOptions, LoadedModel
    from dmr_llamacpp.threads import default_threads

    threads = default_threads()
    options = ContextOptions(
        n_ctx=4096 * 8,
        n_batch=512,
        n_ubatch=512,
        n_seq_max=8,
        threads=threads,
        threads_batch=threads,
        kv_unified=False,
    )
    model = LoadedModel(gguf, options, use_mmap=placement == "mmap")
    batch = Batch(512)
    prompt = model.tokenize(PROMPT, add_special=True)
    for position, token in enumerate(prompt):
        last = batch.add(token, position, 0, wants_logits=position == len(prompt) - 1)
    if batch.decode(model) != 0:
        raise SystemExit("the prompt did not decode")
    token, position, times = model.greedy_token(last), len(prompt), []
    import time

    for _ in range(steps):
        batch.clear()
        batch.add(token if token is not None else 0, position, 0, wants_logits=True)
        position += 1
        started = time.perf_counter()
        if batch.decode(model) != 0:
            raise SystemExit("a step did not decode")
        times.append(time.perf_counter() - started)
        token = model.greedy_token(0)
    llama_cpp.llama_memory_clear(model.memory, True)
    print(
        json.dumps(
            {"step_ms": statistics.median(times) * 1000, "huge_bytes": anon_huge_page_bytes()}
        )
    )


def run_child(gguf: Path, placement: str, steps: int) -> dict[str, float]:
    from dmr_llamacpp.huge_pages import huge_page_env

    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if placement == "huge-pages":
        env.update(huge_page_env({}))
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(gguf), placement, str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    from llamacpp_concurrency import bench_models

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,random-0.6b,random-gemma3")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    header = "| model | mmap ms/step | read ms/step | huge pages ms/step | huge ÷ mmap "
    print(header + "| MiB in huge pages |")
    print("|---|---|---|---|---|---|")
    for name, gguf in bench_models(args.models):
        found: dict[str, list[dict[str, float]]] = {placement: [] for placement in PLACEMENTS}
        for number in range(args.rounds):
            order = PLACEMENTS if number % 2 == 0 else PLACEMENTS[::-1]
            for placement in order:
                found[placement].append(run_child(gguf, placement, args.steps))
        step = {p: statistics.median(r["step_ms"] for r in found[p]) for p in PLACEMENTS}
        huge = statistics.median(r["huge_bytes"] for r in found["huge-pages"]) / 2**20
        print(
            f"| {name} | {step['mmap']:.2f} | {step['read']:.2f} | {step['huge-pages']:.2f} "
            f"| {step['huge-pages'] / step['mmap']:.2f} | {huge:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
