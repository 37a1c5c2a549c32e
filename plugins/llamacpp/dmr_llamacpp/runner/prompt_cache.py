"""Prompts kept in host memory once their slot is taken by another (llama-server's
`--cache-ram`): when a later request shares more with a saved prompt than with any
slot, the saved KV cells are copied back instead of decoding the prompt again."""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

__all__ = ["HostPromptCache", "SavedPrompt", "common_prefix_length"]


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


@dataclass(frozen=True)
class SavedPrompt:
    tokens: tuple[int, ...]
    state: np.ndarray  # uint8, as llama_state_seq_get_data wrote it

    @property
    def size(self) -> int:
        return int(self.state.nbytes)

    @property
    def pointer(self) -> Any:
        return self.state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


class HostPromptCache:
    """Sequence states by their tokens, least recently used dropped beyond `budget_bytes`.

    Used only from the decode thread, which owns the context.
    """

    def __init__(self, ctx: Any, memory: Any, budget_bytes: int) -> None:
        self._ctx = ctx
        self._memory = memory
        self.budget_bytes = budget_bytes
        self.bytes_used = 0
        self._entries: OrderedDict[tuple[int, ...], SavedPrompt] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: tuple[int, ...]) -> bool:
        return tokens in self._entries

    def save(self, seq_id: int, tokens: list[int]) -> None:
        """Copy the sequence's cells (which hold exactly `tokens`) into host memory."""
        key = tuple(tokens)
        if not key or key in self._entries:
            return
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, seq_id))
        if size <= 0 or size > self.budget_bytes:
            return
        # Not a ctypes array: that would be zeroed first, which cost three times the
        # copy itself (45 ms for a 1,800-token prompt of SmolLM2-135M, 15 without).
        state = np.empty(size, dtype=np.uint8)
        pointer = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if int(llama_cpp.llama_state_seq_get_data(self._ctx, pointer, size, seq_id)) != size:
            return
        # A saved prompt that this one extends can only serve requests this one serves too.
        for older in [old for old in self._entries if key[: len(old)] == old]:
            self._drop(older)
        while self._entries and self.bytes_used + size > self.budget_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = SavedPrompt(key, state)
        self.bytes_used += size

    def best_match(self, prompt: list[int]) -> tuple[SavedPrompt | None, int]:
        """The saved prompt sharing the longest prefix with `prompt`, and that length."""
        best: SavedPrompt | None = None
        best_shared = 0
        for entry in self._entries.values():
            shared = common_prefix_length(list(entry.tokens), prompt)
            if shared > best_shared:
                best, best_shared = entry, shared
        return best, best_shared

    def restore(self, entry: SavedPrompt, seq_id: int) -> bool:
        """Replace the sequence's cells with the saved ones; the entry leaves the cache
        (the slot holds it now, and saves it again when it is taken)."""
        self._drop(entry.tokens)
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        copied = llama_cpp.llama_state_seq_set_data(self._ctx, entry.pointer, entry.size, seq_id)
        return int(copied) > 0

    def _drop(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes_used -= entry.size
