"""Which kind of kernel computed each cached KV row, so that a cache hit can give a
cold prefill's logits bit for bit (docs/scheduler.md, "Prompt caches across reloads").

ggml's CPU kernels round differently by the shape of a micro-batch, not by its
content or offset. Measured on SmolLM2 Q4_1, a 0.6B Q8_0 llama and Gemma 3 270M
Q8_0, with and without the AMX weight buffers, a row's values depend only on:

- `TILED`: computed in a micro-batch of 64 rows of its sequence or more: flash
  attention's tiled kernel (GGML_FA_TILE_Q in ggml-cpu/common.h), whatever the
  micro-batch's size or offset;
- `SMALL`: 2 to 63 rows: flash attention row by row, whatever the count;
- `ALONE`: one row whose KV view holds 512 cells or more, split over the threads
  (llama.cpp pads the view to a multiple of 256 cells, so from position 256 on);
  one row before that is `SMALL`;
- `MIXED`: with other sequences in the step (llama.cpp splits such a batch into
  micro-batches of equal rows per sequence), or an image: unknown. Decoding them
  again would most likely be mixed too, so a cache hit keeps them;
- `MOVED`: copied back from host memory or disk into another layout of cells (a
  sliding-window model's: llama.cpp saves only the window's cells and sets them at
  the start of the stream), which the kernels sum in another order: never a cold
  prefill's, and a cache hit keeps them too. But a sliding-window prompt's copy made
  at its `settle_point`, over which the prompt went on: its kinds stand.

A cold prefill decodes a prompt in micro-batches of `n_ubatch` from its first token, so
all its rows but the last micro-batch's are `TILED`. A cached prefix whose rows are of
the kinds a cold prefill gives them, followed by the rest decoded in micro-batches
that give the rest those kinds too (`exact_start`), yields the cold prefill's logits.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ALONE",
    "FLASH_ATTN_TILE_ROWS",
    "KINDS",
    "MIXED",
    "MOVED",
    "SMALL",
    "TILED",
    "RowKinds",
    "exact_start",
    "prompt_chunk_limit",
    "repeat_tail",
    "row_kind",
    "settle_point",
]

MIXED, ALONE, SMALL, TILED, MOVED = 0, 1, 2, 3, 4
KINDS = (MIXED, ALONE, SMALL, TILED, MOVED)
FLASH_ATTN_TILE_ROWS = 64
# One query row against a KV view of 512 cells or more splits the cells over the
# threads; the view is the cells in use padded to 256 (llama_kv_cache::get_n_kv).
SPLIT_KV_FROM_POSITION = 256


def row_kind(rows: int, *, alone: bool, first_row: int) -> int:
    """The kind of the `rows` rows from position `first_row` that one sequence put
    into a step (`alone`: no other sequence had rows in it)."""
    if not alone:
        return MIXED
    if rows >= FLASH_ATTN_TILE_ROWS:
        return TILED
    if rows == 1 and first_row >= SPLIT_KV_FROM_POSITION:
        return ALONE
    return SMALL


class RowKinds:
    """The kinds of a sequence's rows, as runs of `(end, kind)` with increasing ends.

    Rows are written in order, each step from where the cells were last cut: a
    write at `start` forgets the kinds of every row from `start` on.
    """

    def __init__(self, runs: Iterable[tuple[int, int]] = ()) -> None:
        self.runs: list[tuple[int, int]] = []
        for end, kind in runs:
            self.write(self.end, end - self.end, kind)

    @property
    def end(self) -> int:
        return self.runs[-1][0] if self.runs else 0

    def write(self, start: int, rows: int, kind: int) -> None:
        while self.runs and self.runs[-1][0] > start:
            _end, cut_kind = self.runs.pop()
            if self.end < start:  # the run began before `start`: keep its head
                self.runs.append((start, cut_kind))
        if start > self.end:  # rows whose kind nobody recorded
            self.runs.append((start, MIXED))
        if rows <= 0:
            return
        if self.runs and self.runs[-1][1] == kind:
            self.runs[-1] = (start + rows, kind)
        else:
            self.runs.append((start + rows, kind))

    def kind_at(self, row: int) -> int:
        for end, kind in self.runs:
            if row < end:
                return kind
        return MIXED

    def as_list(self, rows: int) -> list[tuple[int, int]]:
        """The runs of the first `rows` rows (what a copy of that many cells holds)."""
        kept = RowKinds(self.runs)
        kept.write(rows, 0, MIXED)
        return list(kept.runs)

    def matching_prefix(self, limit: int, prompt_length: int, n_ubatch: int) -> int:
        """How many of the first `limit` rows have the kinds a cold prefill of
        `prompt_length` tokens gives them: `TILED` before its last micro-batch, and
        that micro-batch's kind in it."""
        last_micro_batch = prompt_length % n_ubatch or n_ubatch
        boundary = prompt_length - last_micro_batch
        tail_kind = row_kind(last_micro_batch, alone=True, first_row=boundary)
        row = 0
        for end, kind in self.runs:
            stop = min(end, limit)
            if row < min(stop, boundary):
                if kind != TILED:
                    return row
                row = min(stop, boundary)
            if row < stop:
                if kind != tail_kind:
                    return row
                row = stop
            if row >= limit:
                return limit
        return row


def repeat_tail(prompt_length: int, n_ubatch: int) -> int:
    """The fewest last rows of a prompt that, decoded again alone, get the kind its cold
    prefill gave them: 64 where its last micro-batch is `TILED`, else two, or one where a
    single row is `SMALL` too (a prompt shorter than 257 tokens: as without exactness)."""
    last_micro_batch = prompt_length % n_ubatch or n_ubatch
    tail_kind = row_kind(last_micro_batch, alone=True, first_row=prompt_length - last_micro_batch)
    if tail_kind == TILED:
        return FLASH_ATTN_TILE_ROWS
    if row_kind(1, alone=True, first_row=prompt_length - 1) == tail_kind:
        return 1
    return 2


def settle_point(prompt_length: int, n_ubatch: int) -> int:
    """Where a cold prefill may stop for a step and go on without changing any row's
    kind: before the rows a repeat decodes again (`repeat_tail`), or where those rows
    alone would change the kind of the rest of the last micro-batch, before that
    micro-batch (a sliding-window model's prompt is copied there and goes on over
    the copy: `BatchedGenerator._settle_window`)."""
    last_micro_batch = prompt_length % n_ubatch or n_ubatch
    last_start = prompt_length - last_micro_batch
    split = last_micro_batch - repeat_tail(prompt_length, n_ubatch)
    whole = row_kind(last_micro_batch, alone=True, first_row=last_start)
    if split and row_kind(split, alone=True, first_row=last_start) != whole:
        return last_start
    return last_start + split


def exact_start(kinds: RowKinds, reusable: int, prompt_length: int, n_ubatch: int) -> int:
    """Where to start decoding a prompt whose first `reusable` tokens the cache holds,
    so that its last token's logits are a cold prefill's: at most `reusable`, and
    `reusable` itself where rows decoded beside others or moved (`MIXED`, `MOVED`) are
    in the way: decoding them again would not be exact either, or (a sliding-window
    model's short prompts from host memory) cost a whole prompt on every hit.

    The rest is decoded in micro-batches that end on multiples of `n_ubatch` (the
    runner's prompt chunks, `prompt_chunk_limit`), so the start moves back until the
    first of them holds 64 rows (`TILED`) before the last micro-batch, or the last
    micro-batch gets the kind a cold prefill gives it (`repeat_tail`).
    """
    start = kinds.matching_prefix(reusable, prompt_length, n_ubatch)
    if start < reusable and kinds.kind_at(start) in (MIXED, MOVED):
        return reusable
    start = min(start, prompt_length - repeat_tail(prompt_length, n_ubatch))
    last_start = prompt_length - (prompt_length % n_ubatch or n_ubatch)
    if start < last_start:
        first_chunk = n_ubatch - start % n_ubatch
        if first_chunk < FLASH_ATTN_TILE_ROWS:
            start = max(0, start + first_chunk - FLASH_ATTN_TILE_ROWS)
    return start


def prompt_chunk_limit(position: int, n_ubatch: int) -> int:
    """The most prompt tokens from `position` one step takes: up to the next multiple
    of `n_ubatch`, where a cold prefill's micro-batches end."""
    return n_ubatch - position % n_ubatch
