"""What one `llama_decode` step costs with N generating sequences, by KV layout.

    python bench/decode_batch_cost.py [--models smollm2,random-0.6b,NAME=PATH]
           [--sequences 8,16,32] [--prompt 200] [--idle 0] [--flash-attn auto]

The measure behind the llama.cpp runner's slots (docs/scheduler.md, "More streams
than slots"): each sequence first decodes a `--prompt`-token prompt, then every
step decodes one token of each (no Python around it but the batch), and the
median of 40 steps is reported as a step time and tokens/s. Two layouts:

- `streams`: a KV stream of 4,096 cells per sequence (`kv_unified` off, what the
  runner and llama-server with `--parallel` use); memory grows with the slots;
- `spread`: the same streams, as many as the largest `--sequences`, with the N
  sequences spread over them (ids 0, 4, 8, ... of 32): llama.cpp's attention spans
  every stream from the lowest id in a batch to the highest;
- `unified`: one pool of 8 x 4,096 cells that all the sequences share (memory
  stays that of 8 slots); `--idle N` puts an idle cached prompt of N tokens in it.

It computes as the runner does: with dmr's batched Q4_1 kernel in front of llama.cpp's
(docs/scheduler.md, "Batched Q4_1 products"); `DMR_LLAMACPP_Q4_1_GEMM=0` measures
without it.
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
from dmr_llamacpp.runner.model import Batch, ContextOptions, LoadedModel

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_concurrency import bench_models

CELLS_PER_SLOT = 4096
STEPS = 40
FLASH = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


def load(path: Path, layout: str, sequences: int, flash: int) -> LoadedModel:
    unified = layout == "unified"  # `spread` is `streams`, with other ids
    return LoadedModel(
        path,
        ContextOptions(
            n_ctx=CELLS_PER_SLOT * (8 if unified else sequences),
            n_batch=512,
            n_ubatch=512,
            n_seq_max=sequences,
            threads=2,
            threads_batch=2,
            flash_attn=flash,
            kv_unified=unified,
        ),
    )


def prefill(model: LoadedModel, batch: Batch, seq_id: int, tokens: int) -> None:
    done = 0
    while done < tokens:
        batch.clear()
        for position in range(done, min(tokens, done + batch.capacity)):
            token = 100 + (position * 7 + seq_id) % 1000
            batch.add(token, position, seq_id, wants_logits=position == tokens - 1)
        if batch.decode(model) != 0:
            raise RuntimeError("the prompt did not fit the KV cache")
        done = min(tokens, done + batch.capacity)


def step_seconds(model: LoadedModel, ids: list[int], prompt: int, idle: int) -> float:
    batch = Batch(512)
    try:
        if idle:
            prefill(model, batch, max(ids) + 1, idle)  # the last sequence id: never decoded
        for seq_id in ids:
            prefill(model, batch, seq_id, prompt)
        times: list[float] = []
        for step in range(STEPS):
            batch.clear()
            for seq_id in ids:
                batch.add(200 + step, prompt + step, seq_id, wants_logits=True)
            started = time.perf_counter()
            if batch.decode(model) != 0:
                raise RuntimeError("a step did not fit the KV cache")
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        batch.free()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,random-0.6b")
    parser.add_argument("--sequences", default="8,16,32")
    parser.add_argument("--prompt", type=int, default=200)
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--flash-attn", choices=sorted(FLASH), default="auto")
    args = parser.parse_args()
    counts = [int(value) for value in args.sequences.split(",")]
    llama_cpp.llama_backend_init()
    print(f"batched Q4_1 kernel: {activate(Q4_1_KERNEL).status}\n")
    print("| model | layout | sequences | step ms | tokens/s |")
    print("|---|---|---|---|---|")
    for name, path in bench_models(args.models):
        for layout in ("streams", "spread", "unified"):
            for sequences in counts:
                streams = max(counts) if layout == "spread" else sequences
                ids = [index * streams // sequences for index in range(sequences)]
                # One more sequence id than decodes: the idle prompt's, in every layout.
                model = load(path, layout, streams + 1, FLASH[args.flash_attn])
                try:
                    seconds = step_seconds(model, ids, args.prompt, args.idle)
                finally:
                    model.close()
                print(
                    f"| {name} | {layout} | {sequences} | {seconds * 1000:.1f} "
                    f"| {sequences / seconds:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
