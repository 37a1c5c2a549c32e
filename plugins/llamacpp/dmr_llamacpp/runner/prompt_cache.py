"""Prompts kept in host memory once their slot is taken by another (llama-server's
`--cache-ram`): when a later request shares more with a saved prompt than with any
slot, the saved KV cells are copied back instead of decoding the prompt again."""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from dmr_llamacpp.runner.row_kinds import MOVED, RowKinds

__all__ = [
    "HostPromptCache",
    "SavedPrompt",
    "common_prefix_length",
    "copy_lowest_position",
    "copy_sequence_state",
    "copy_serves_prefixes",
    "kinds_as_restored",
    "restore_sequence_state",
    "window_reaches",
]


def common_prefix_length(first: list[int], second: list[int]) -> int:
    """How many leading tokens the two lists share (binary search on C-speed slices)."""
    low, high = 0, min(len(first), len(second))
    if first[:high] == second[:high]:
        return high
    high -= 1  # the whole of the shorter list does not match
    while low < high:  # the longest match has a length in [low, high]
        middle = (low + high + 1) // 2
        if first[:middle] == second[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def window_reaches(n_swa: int, lowest: int, start: int) -> bool:
    """Whether cells that hold positions from `lowest` on serve decoding from position
    `start` of a model attending over `n_swa` positions in its sliding-window layers
    (0: none): a row attends to the `n_swa` positions up to its own, which must be
    there. Cells computed in place hold every position (llama.cpp's full-size window
    cache, its API's default), but a copy (`llama_state_seq_get_data`) keeps only the
    window of its last position: a saved prompt serves its own length, not a prefix
    reaching further back, and a slot that holds one cannot be cut back below it.
    (The window of a chunked or symmetric model reaches back less: checked for the
    widest, a standard window.)"""
    return n_swa == 0 or lowest <= max(0, start - n_swa + 1)


def copy_lowest_position(n_swa: int, rows: int) -> int:
    """The lowest position a copy of `rows` cells holds (`window_reaches`)."""
    return max(0, rows - n_swa) if n_swa else 0


def copy_serves_prefixes(n_swa: int, rows: int) -> bool:
    """Whether a copy of `rows` cells holds them all, so it serves every prefix of its
    tokens (no window, or one that reaches back to the first)."""
    return copy_lowest_position(n_swa, rows) == 0


def kinds_as_restored(kinds: RowKinds, rows: int, n_swa: int) -> list[tuple[int, int]]:
    """The kinds of kernel (row_kinds.py) a copy of a sequence's `rows` cells has once
    copied back: as computed, or `MOVED` where the window dropped cells from the copy,
    as the rest then lands at the start of the stream, a layout the kernels sum in
    another order than the cells had (but `BatchedGenerator._settle_window`'s copies)."""
    if not copy_serves_prefixes(n_swa, rows):
        return [(rows, MOVED)]
    return kinds.as_list(rows)


def copy_sequence_state(ctx: Any, seq_id: int, limit_bytes: int) -> np.ndarray | None:
    """The sequence's KV cells as `llama_state_seq_get_data` writes them (uint8), or
    None when there are none or they take more than `limit_bytes`."""
    size = int(llama_cpp.llama_state_seq_get_size(ctx, seq_id))
    if size <= 0 or size > limit_bytes:
        return None
    # Not a ctypes array: that would be zeroed first, which cost three times the
    # copy itself (45 ms for a 1,800-token prompt of SmolLM2-135M, 15 without).
    state = np.empty(size, dtype=np.uint8)
    pointer = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    if int(llama_cpp.llama_state_seq_get_data(ctx, pointer, size, seq_id)) != size:
        return None
    return state


def restore_sequence_state(ctx: Any, memory: Any, state: np.ndarray, seq_id: int) -> bool:
    """Replace the sequence's cells with `state`; False when llama.cpp refuses it (the
    sequence is then empty)."""
    llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
    pointer = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    if int(llama_cpp.llama_state_seq_set_data(ctx, pointer, state.nbytes, seq_id)) > 0:
        return True
    llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
    return False


@dataclass(frozen=True)
class SavedPrompt:
    tokens: tuple[int, ...]
    state: np.ndarray  # uint8, as llama_state_seq_get_data wrote it
    kinds: tuple[tuple[int, int], ...] = ()  # RowKinds.runs of the cells

    @property
    def size(self) -> int:
        return int(self.state.nbytes)


class HostPromptCache:
    """Sequence states by their tokens, least recently used dropped beyond `budget_bytes`.

    Used only from the decode thread, which owns the context. `n_swa` is the model's
    sliding window (0: none): a copy of such a model's sequence serves only its own
    length (`window_reaches`), never a prefix of it.
    """

    def __init__(self, ctx: Any, memory: Any, budget_bytes: int, n_swa: int = 0) -> None:
        self._ctx = ctx
        self._memory = memory
        self.budget_bytes = budget_bytes
        self.n_swa = n_swa
        self.bytes_used = 0
        self._entries: OrderedDict[tuple[int, ...], SavedPrompt] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: tuple[int, ...]) -> bool:
        return tokens in self._entries

    def save(self, seq_id: int, tokens: list[int], kinds: RowKinds | None = None) -> None:
        """Copy the sequence's cells (which hold exactly `tokens`) into host memory."""
        key = tuple(tokens)
        if not key or key in self._entries:
            return
        state = copy_sequence_state(self._ctx, seq_id, self.budget_bytes)
        if state is not None:
            self.keep(key, state, kinds_as_restored(kinds or RowKinds(), len(key), self.n_swa))

    def keep(
        self,
        key: tuple[int, ...],
        state: np.ndarray,
        kinds: Sequence[tuple[int, int]] = (),
    ) -> bool:
        """Add a copied state (`save`'s, or one read from disk) as the newest entry;
        False when it does not fit the budget."""
        size = int(state.nbytes)
        if not key or key in self._entries or size > self.budget_bytes:
            return False
        # A saved prompt that this one extends can only serve requests this one serves too.
        if copy_serves_prefixes(self.n_swa, len(key)):
            for older in [old for old in self._entries if key[: len(old)] == old]:
                self._drop(older)
        while self._entries and self.bytes_used + size > self.budget_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = SavedPrompt(key, state, tuple(kinds))
        self.bytes_used += size
        return True

    def newest_first(self) -> list[SavedPrompt]:
        return list(reversed(self._entries.values()))

    def best_match(self, prompt: list[int]) -> tuple[SavedPrompt | None, int]:
        """The saved prompt sharing the longest prefix with `prompt` that it can serve
        (`window_reaches`: at least the last token is decoded again), and that length."""
        best: SavedPrompt | None = None
        best_shared = 0
        for entry in self._entries.values():
            shared = common_prefix_length(list(entry.tokens), prompt)
            lowest = copy_lowest_position(self.n_swa, len(entry.tokens))
            start = min(shared, len(prompt) - 1)
            if shared > best_shared and window_reaches(self.n_swa, lowest, start):
                best, best_shared = entry, shared
        return best, best_shared

    def restore(self, entry: SavedPrompt, seq_id: int, *, keeps: int) -> bool:
        """Replace the sequence's cells with the saved ones, of which the request keeps
        the first `keeps`. An entry kept whole leaves the cache (the slot holds it now,
        and saves it again when it is taken), but a sliding-window model's that the
        slot's later copy would not serve; one kept in part stays, as the most
        recently used: the slot cuts the rest of its cells, which were lost with the
        entry (a sibling conversation sharing a system prompt took them for good)."""
        if keeps >= len(entry.tokens) and copy_serves_prefixes(self.n_swa, len(entry.tokens)):
            self._drop(entry.tokens)
        elif entry.tokens in self._entries:  # (a save just before may have pushed it out)
            self._entries.move_to_end(entry.tokens)
        return restore_sequence_state(self._ctx, self._memory, entry.state, seq_id)

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes_used -= entry.size
