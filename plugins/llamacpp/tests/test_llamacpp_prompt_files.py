"""Prompt cache files (runner/prompt_files.py): what reads back, what is refused, and
the cap over the whole store. The files' states here are plain bytes; the real runner
writing and reading them is tests/test_prompt_cache_reload.py."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from dmr_llamacpp.runner.prompt_files import CacheKey, PromptFiles, SavedState
from dmr_llamacpp.runner.row_kinds import ALONE, SMALL, TILED

KEY = CacheKey(
    llama_cpp_version="0.3.36",
    model_file="model.gguf:1000",
    ctx_per_slot=4096,
    parallel=8,
    n_batch=512,
    n_ubatch=512,
    cache_type_k="f16",
    cache_type_v="f16",
    flash_attn="auto",
    n_gpu_layers=0,
)


def later() -> float:
    """A save deadline that is not reached."""
    return time.monotonic() + 60


def prompt(first: int, size: int = 1000) -> SavedState:
    return SavedState(tuple(range(first, first + 20)), np.full(size, first % 251, dtype=np.uint8))


def files(root: Path, model: str = "a" * 64, key: CacheKey = KEY, cap: int = 10**6) -> PromptFiles:
    return PromptFiles(root / "prompt-cache" / model, key, cap)


def loaded(store: PromptFiles) -> list[tuple[tuple[int, ...], bytes]]:
    return [(saved.tokens, saved.state.tobytes()) for saved in store.load()]


def test_saved_prompts_read_back_newest_first(tmp_path: Path) -> None:
    store = files(tmp_path)
    assert store.save([prompt(1), prompt(2)], later()) == 2
    assert loaded(store) == [
        (prompt(1).tokens, prompt(1).state.tobytes()),
        (prompt(2).tokens, prompt(2).state.tobytes()),
    ]
    # They hold the prompts: readable by their owner only (docs/security.md).
    assert {saved.path.stat().st_mode & 0o777 for saved in store.load()} == {0o600}
    # A file read back counts as used: it comes first now.
    [_, older] = list(store.load())
    time.sleep(0.01)
    store.touch(older.path)
    assert [saved.tokens for saved in store.load()] == [prompt(2).tokens, prompt(1).tokens]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[: len(data) - 10], "truncated state"),
        (lambda data: data[:10], "truncated header"),
        (lambda data: data + b"x", "longer than its header says"),
        (lambda data: b"GGUF" + data[4:], "not a dmr prompt cache file"),
        (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "checksum mismatch"),
    ],
)
def test_a_damaged_file_is_logged_removed_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, reason: str
) -> None:
    store = files(tmp_path)
    store.save([prompt(1), prompt(2)], later())
    [newest, oldest] = [saved.path for saved in store.load()]
    newest.write_bytes(damage(newest.read_bytes()))  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="dmr_llamacpp.runner.prompt_files"):
        assert [saved.path for saved in store.load()] == [oldest]
    assert f"ignoring the saved prompt cache {newest}: {reason}" in caplog.text
    assert not newest.exists()


def test_files_of_other_settings_are_not_read(tmp_path: Path) -> None:
    files(tmp_path).save([prompt(1)], later())
    other = dataclasses.replace(KEY, llama_cpp_version="0.3.37")
    assert list(files(tmp_path, key=other).load()) == []  # another folder: another key
    # The same file moved under the other key's folder is refused by its header.
    source = next((tmp_path / "prompt-cache").glob("*/*/*.kv"))
    target = files(tmp_path, key=other).folder
    target.mkdir(parents=True)
    os.replace(source, target / source.name)
    assert list(files(tmp_path, key=other).load()) == []
    assert not (target / source.name).exists()


def test_the_cap_drops_the_least_recently_used_of_every_model(tmp_path: Path) -> None:
    # Each file is its 1,000-byte state plus a header of a few hundred bytes: two fit.
    first = files(tmp_path, model="a" * 64, cap=3000)
    first.save([prompt(1)], later())
    time.sleep(0.01)
    second = files(tmp_path, model="b" * 64, cap=3000)
    second.save([prompt(2), prompt(3)], later())
    assert [saved.tokens for saved in second.load()] == [prompt(2).tokens, prompt(3).tokens]
    assert list(first.load()) == []  # the oldest file of the store went first


def test_nothing_is_written_past_the_deadline_or_over_the_cap(tmp_path: Path) -> None:
    store = files(tmp_path, cap=500)
    assert store.save([prompt(1, size=600)], later()) == 0  # larger than the whole cap
    assert store.save([prompt(2, size=10)], time.monotonic() - 1) == 0
    assert list(store.load()) == []


def test_a_temp_file_left_by_a_killed_runner_goes_at_the_next_save(tmp_path: Path) -> None:
    store = files(tmp_path)
    store.save([prompt(1)], later())
    stale, fresh = store.folder / ".abc.tmp", store.folder / ".def.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    store.save([prompt(2)], later())
    assert not stale.exists() and fresh.exists()


def test_the_row_kinds_read_back_and_damaged_ones_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kinds of kernel that computed the cells travel with them: a reloaded prompt
    gives a cold prefill's logits only if they are known (runner/row_kinds.py)."""
    store = files(tmp_path)
    kinds = [(12, TILED), (19, SMALL), (20, ALONE)]
    saved = dataclasses.replace(prompt(1), kinds=kinds)
    assert store.save([saved, prompt(2)], later()) == 2
    by_tokens = {file.tokens: file.kinds for file in store.load()}
    assert by_tokens == {prompt(1).tokens: tuple(kinds), prompt(2).tokens: ()}
    # Kinds changed after the write fail the checksum; malformed ones do not parse.
    [first] = [file for file in store.load() if file.tokens == prompt(1).tokens]
    data = first.path.read_bytes()
    first.path.write_bytes(data.replace(b"[12, 3]", b"[12, 2]"))
    [second] = [file for file in store.load() if file.tokens == prompt(2).tokens]
    data = second.path.read_bytes()
    second.path.write_bytes(data.replace(b'"row_kinds": []', b'"row_kinds": {}'))
    with caplog.at_level(logging.WARNING):
        assert loaded(store) == []
    assert "checksum mismatch" in caplog.text
    assert "unreadable row kinds" in caplog.text
