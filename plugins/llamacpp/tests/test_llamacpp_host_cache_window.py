"""What a saved copy of a sliding-window model's sequence can serve (runner/prompt_cache.py).

llama.cpp's copy of such a sequence keeps only the cells inside the window of its last
position: it serves decoding on from its own end, never from a prefix further back,
whose rows would attend to cells the copy lacks. The same rules through a real server:
tests/test_sliding_window_cache.py.
"""

from __future__ import annotations

import numpy as np
from dmr_llamacpp.runner.prompt_cache import (
    HostPromptCache,
    copy_lowest_position,
    kinds_as_restored,
    window_reaches,
)
from dmr_llamacpp.runner.row_kinds import MOVED, TILED, RowKinds

WINDOW = 512


def state(size: int = 64) -> np.ndarray:
    return np.zeros(size, dtype=np.uint8)


def test_a_copy_reaches_back_its_window_only() -> None:
    # A copy of 1,536 cells holds positions 1,024 on: it serves decoding from 1,536,
    # and from 1,535 (its last token again: that row attends to 1,024-1,535), but
    # not from 1,534 or before (rows attend to the 512 positions up to their own).
    lowest = copy_lowest_position(WINDOW, 1536)
    assert lowest == 1024
    assert window_reaches(WINDOW, lowest, 1536)
    assert window_reaches(WINDOW, lowest, 1535)
    assert not window_reaches(WINDOW, lowest, 1534)
    # One no longer than the window holds everything; so does any copy without one.
    assert copy_lowest_position(WINDOW, 400) == 0 and window_reaches(WINDOW, 0, 5)
    assert copy_lowest_position(0, 5000) == 0 and window_reaches(0, 0, 1)


def test_a_long_copy_comes_back_moved() -> None:
    computed = RowKinds([(1536, TILED)])
    assert kinds_as_restored(computed, 1536, WINDOW) == [(1536, MOVED)]
    assert kinds_as_restored(computed, 1536, 0) == [(1536, TILED)]
    assert kinds_as_restored(RowKinds([(300, TILED)]), 300, WINDOW) == [(300, TILED)]


def test_a_copy_serves_only_prompts_it_reaches() -> None:
    cache = HostPromptCache(None, None, 1 << 20, WINDOW)
    prompt = list(range(1825))
    cache.keep(tuple(prompt[:1761]), state())  # a prompt's copy before its last rows
    cache.keep(tuple(prompt + [7] * 16), state())  # the same prompt with its answer
    # Both kept: the longer one does not serve the shorter one's prefix.
    assert len(cache) == 2
    entry, shared = cache.best_match(prompt)
    assert entry is not None and len(entry.tokens) == 1761 and shared == 1761
    # A prompt that shares only a system prompt gets nothing from either.
    assert cache.best_match(prompt[:300] + [9] * 500) == (None, 0)
    # A follow-up turn extends the answer's copy: served from its end; so is the
    # very prompt the copy holds (a preempted request taken up again).
    entry, shared = cache.best_match(prompt + [7] * 16 + [8] * 20)
    assert entry is not None and shared == 1841
    entry, shared = cache.best_match(prompt + [7] * 16)
    assert entry is not None and shared == 1841


def test_without_a_window_a_longer_copy_replaces_its_prefixes() -> None:
    cache = HostPromptCache(None, None, 1 << 20, 0)
    prompt = tuple(range(1825))
    cache.keep(prompt[:1761], state())
    cache.keep(prompt, state())
    assert len(cache) == 1
    assert cache.best_match(list(prompt[:300]) + [9] * 500)[1] == 300
