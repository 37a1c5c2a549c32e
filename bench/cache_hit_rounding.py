"""How a cache hit's logits and time depend on the rows it decodes again.

    python bench/cache_hit_rounding.py [--models smollm2,random-0.6b,random-gemma3]
        [--lengths 1791,1560,1080,100,40] [--flash auto|on|off]

For each model and prompt length: a cold prefill (micro-batches of 512 from the first
token, the runner's defaults otherwise: a 4,096-cell KV stream per slot, 2 threads),
then for each tail `t` the prompt's last `t` tokens decoded again over the cached
rest. It prints the largest logit difference from the cold prefill (0: bit for bit)
and the median time of that decode. The kinds of kernel behind the differences, and
the rule the runner follows, are in plugins/llamacpp/dmr_llamacpp/runner/row_kinds.py
and docs/scheduler.md ("Prompt caches across reloads").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TAILS = (1, 2, 8, 32, 63, 64, 65, 128)
TIMED = 5


def decode(model: Any, batch: Any, tokens: list[int], start: int, end: int) -> np.ndarray:
    """Decode `tokens[start:end]` in micro-batches that end on multiples of 512 (as a
    cold prefill's and the runner's prompt chunks do); the last token's logits."""
    while start < end:
        stop = min(end, start + 512 - start % 512)
        batch.clear()
        for position in range(start, stop):
            batch.add(tokens[position], position, 0, wants_logits=position == end - 1)
        if batch.decode(model) != 0:
            raise SystemExit("llama_decode failed")
        start = stop
    logits: np.ndarray = model.logits(batch.n_tokens - 1)
    return logits


def one_length(model: Any, batch: Any, tokens: list[int], length: int) -> str:
    import llama_cpp

    model.forget_sequence(0)
    cold = decode(model, batch, tokens, 0, length)
    cells: list[str] = []
    for tail in sorted({*TAILS, length % 512 or 512}):
        if tail > length:
            continue
        times = []
        for _ in range(TIMED):
            llama_cpp.llama_memory_seq_rm(model.memory, 0, length - tail, -1)
            started = time.perf_counter()
            logits = decode(model, batch, tokens, length - tail, length)
            times.append((time.perf_counter() - started) * 1000)
        difference = float(np.abs(logits - cold).max())
        cells.append(f"t={tail}: {difference:.2g} {statistics.median(times):.0f}ms")
    return f"  {length} tokens (last micro-batch {length % 512 or 512}): " + ", ".join(cells)


def main() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from decode_batch_cost import CELLS_PER_SLOT, FLASH
    from dmr.sample_model import ensure_smollm2_gguf
    from dmr_llamacpp.runner.model import Batch, ContextOptions, LoadedModel, silence_llama_logs
    from llamacpp_concurrency import RANDOM_MODELS, random_model

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,random-0.6b,random-gemma3")
    parser.add_argument("--lengths", default="1791,1560,1080,100,40")
    parser.add_argument("--flash", choices=sorted(FLASH), default="auto")
    args = parser.parse_args()
    silence_llama_logs()
    text = (REPO / "README.md").read_text() * 4
    for name in args.models.split(","):
        path = ensure_smollm2_gguf() if name == "smollm2" else random_model(*RANDOM_MODELS[name])
        options = ContextOptions(
            n_ctx=CELLS_PER_SLOT * 8,
            n_batch=512,
            n_ubatch=512,
            n_seq_max=8,
            threads=2,
            threads_batch=2,
            flash_attn=FLASH[args.flash],
            kv_unified=False,
        )
        model = LoadedModel(path, options)
        tokens = model.tokenize(text, add_special=True)
        batch = Batch(512)
        print(f"{name} (extra buffers: {model.extra_buffers}, flash attention {args.flash})")
        for length in (int(value) for value in args.lengths.split(",")):
            print(one_length(model, batch, tokens, length), flush=True)
        batch.free()
        model.close()


if __name__ == "__main__":
    main()
