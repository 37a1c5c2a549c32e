"""dmr's batched Q4_1 kernel against llama.cpp's own products, in one process.

    python bench/q4_1_kernel.py [--model smollm2] [--tokens 1,2,3,4,8,16,32]
           [--context 100] [--rounds 16]

One `llama_decode` of N tokens of one sequence, after a `--context`-token prompt,
with the kernel on and off in turns (it is switched in place, so both share the
process, the weights and the page state); the medians and on ÷ off per N. Every
token of a decode goes through the same matrix products, so N tokens of one sequence
cost what one step of N sequences costs in those products. The kernel leaves fewer
than 2 tokens to llama.cpp (docs/scheduler.md, "Batched Q4_1 products"); this bench
switches that off too, so the first row shows why.
"""

# The kernel must load before llama_cpp does (plugins/llamacpp's runner/q4_1_gemm.py).
# ruff: noqa: E402
from __future__ import annotations

from dmr_llamacpp.runner.q4_1_gemm import activate, load_before_llama_cpp

Q4_1_KERNEL = load_before_llama_cpp()

import argparse
import statistics
import sys
import time
from pathlib import Path

import llama_cpp

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_concurrency import bench_models


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", default="1,2,3,4,8,16,32")
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=16)
    args = parser.parse_args()
    llama_cpp.llama_backend_init()
    kernel = activate(Q4_1_KERNEL)
    if kernel.library is None or not kernel.variant:
        raise SystemExit(f"the batched Q4_1 kernel is {kernel.status}")
    [(name, path)] = bench_models(args.model)
    llm = llama_cpp.Llama(
        str(path), n_ctx=1024, n_batch=512, n_threads=2, use_mmap=False, verbose=False
    )
    counts = [int(value) for value in args.tokens.split(",")]
    prompt = llm.tokenize(("The quick brown fox jumps over the lazy dog. " * 60).encode())
    assert len(prompt) >= args.context + max(counts), "a longer prompt is needed"
    kernel.library.dmr_q41_set_min_tokens(1)  # every count through the kernel when on
    print(f"{name}, kernel {kernel.status}, {args.rounds} rounds each\n")
    print("| tokens | llama.cpp ms | kernel ms | kernel ÷ llama.cpp |")
    print("|---|---|---|---|")
    for count in counts:
        seconds: dict[int, list[float]] = {0: [], kernel.variant: []}
        for number in range(args.rounds):
            order = (0, kernel.variant) if number % 2 else (kernel.variant, 0)
            for variant in order:
                kernel.library.dmr_q41_enable(variant)
                llm.reset()
                llm.eval(prompt[: args.context])
                started = time.perf_counter()
                llm.eval(prompt[args.context : args.context + count])
                seconds[variant].append(time.perf_counter() - started)
        off = statistics.median(seconds[0])
        on = statistics.median(seconds[kernel.variant])
        print(f"| {count} | {off * 1000:.2f} | {on * 1000:.2f} | {on / off:.2f} |", flush=True)


if __name__ == "__main__":
    main()
