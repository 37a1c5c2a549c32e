"""What a decode step costs by the order and gaps of its sequence ids.

    python bench/ubatch_split.py [GGUF] [--steps 15]

With a KV stream per slot (the runner's layout, llama-server's with `--parallel`),
llama.cpp splits a batch into ubatches of consecutive, increasing sequence ids only
(`llama_batch_allocr::split_equal`), and every ubatch is a pass over the weights.
This decodes one token for each of eight sequences (or fewer) per step, in the
orders below, and prints the median step time of each: ids out of order, or with
a gap, cost a pass more per break. (The runner fills a gap with a throwaway token
in the idle slot, so a gap costs what the whole range in order does.) Default
model: the random 0.6B of bench/llamacpp_concurrency.py (written once), since a
pass costs most where the weights are biggest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLOTS = 32
PROMPT_TOKENS = 30

LAYOUTS: list[tuple[str, list[int]]] = [
    ("ids 0-7, in order", list(range(8))),
    ("ids 0-6 (seven, no gap)", list(range(7))),
    ("ids 0-2 and 4-7 (a gap at 3)", [0, 1, 2, 4, 5, 6, 7]),
    ("ids 0, 2, 4, 6, 7 (three gaps)", [0, 2, 4, 6, 7]),
    ("ids 0-4 (five, no gap)", list(range(5))),
    ("ids 0-7 in arrival order 0,1,4,7,3,2,6,5", [0, 1, 4, 7, 3, 2, 6, 5]),
]


def main() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from decode_batch_cost import FLASH, load, prefill
    from dmr_llamacpp.runner.model import Batch, silence_llama_logs
    from llamacpp_concurrency import RANDOM_MODELS, random_model

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("gguf", type=Path, nargs="?")
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    gguf = args.gguf or random_model(*RANDOM_MODELS["random-0.6b"])

    silence_llama_logs()
    model = load(gguf, "streams", SLOTS, FLASH["auto"])  # a 4,096-cell stream per slot
    batch = Batch(512)
    positions = [0] * SLOTS

    def step(ids: list[int]) -> float:
        batch.clear()
        for seq_id in ids:
            batch.add(100, positions[seq_id], seq_id, wants_logits=True)
            positions[seq_id] += 1
        started = time.perf_counter()
        if batch.decode(model) != 0:
            raise SystemExit("llama_decode failed")
        return (time.perf_counter() - started) * 1000

    for seq_id in range(8):  # a short prompt in each of the eight slots
        prefill(model, batch, seq_id, PROMPT_TOKENS)
        positions[seq_id] = PROMPT_TOKENS
    print(f"{gguf.name}: median ms per step of one token a sequence, {args.steps} steps each")
    for name, ids in LAYOUTS:
        times = [step(ids) for _ in range(args.steps)]
        print(f"  {name:48s} {statistics.median(times):7.1f} ms")
    model.close()


if __name__ == "__main__":
    main()
