"""Which kernel computed each cached row, and where a cache hit starts decoding so that
its logits are a cold prefill's (runner/row_kinds.py). The logits themselves, through
a real runner: test_llamacpp_prompt_cache.py and tests/test_prompt_cache_reload.py."""

from __future__ import annotations

from dmr_llamacpp.runner.row_kinds import (
    ALONE,
    MIXED,
    MOVED,
    SMALL,
    TILED,
    RowKinds,
    exact_start,
    prompt_chunk_limit,
    repeat_tail,
    row_kind,
    settle_point,
)

U = 512  # micro-batch


def kinds(*runs: tuple[int, int]) -> RowKinds:
    return RowKinds(runs)


def test_a_rows_kind_follows_the_kernel_that_computes_it() -> None:
    assert row_kind(64, alone=True, first_row=0) == TILED
    assert row_kind(63, alone=True, first_row=0) == SMALL
    assert row_kind(2, alone=True, first_row=4000) == SMALL
    # One row: split over the threads once its KV view reaches 512 cells.
    assert row_kind(1, alone=True, first_row=255) == SMALL
    assert row_kind(1, alone=True, first_row=256) == ALONE
    assert row_kind(100, alone=False, first_row=0) == MIXED


def test_writes_forget_the_rows_they_replace() -> None:
    rows = RowKinds()
    rows.write(0, 512, TILED)
    rows.write(512, 30, SMALL)
    rows.write(542, 1, ALONE)
    rows.write(543, 1, ALONE)
    assert rows.runs == [(512, TILED), (542, SMALL), (544, ALONE)]
    rows.write(520, 3, ALONE)  # the cells were cut back to 520
    assert rows.runs == [(512, TILED), (520, SMALL), (523, ALONE)]
    assert rows.as_list(100) == [(100, TILED)]
    rows.write(600, 2, SMALL)  # rows nobody recorded are unknown
    assert rows.kind_at(550) == MIXED and rows.kind_at(601) == SMALL


def test_a_repeated_prompt_decodes_the_rows_that_make_it_cold() -> None:
    # Last micro-batch of 64 rows or more: 64 rows; a short prompt: its last row only,
    # as without exactness; a long one with a short last micro-batch: two.
    assert [repeat_tail(length, U) for length in (40, 256, 300, 512, 600)] == [1, 64, 64, 64, 64]
    assert [repeat_tail(length, U) for length in (513, 530, 1025, 1054)] == [1, 2, 1, 2]
    cold = kinds((1536, TILED), (1825, TILED), (1841, ALONE))  # then 16 answer tokens
    assert exact_start(cold, 1824, 1825, U) == 1825 - 64
    short = kinds((1024, TILED), (1054, SMALL), (1060, ALONE))
    assert exact_start(short, 1053, 1054, U) == 1052


def test_a_short_prefix_of_other_kinds_is_decoded_again() -> None:
    # The template's frame, cached from a short prompt (`SMALL`), starts a long prompt
    # that a cold prefill computes `TILED`: decoded again, from the start.
    frame = kinds((25, SMALL), (26, SMALL))
    assert exact_start(frame, 25, 1825, U) == 0
    # A short prompt computes it `SMALL` too: kept.
    assert exact_start(frame, 25, 40, U) == 25


def test_the_first_chunk_after_the_cache_holds_64_rows() -> None:
    cached = kinds((500, TILED))
    # [500, 512) would be 12 rows: the start moves back to 448, a 64-row chunk.
    assert exact_start(cached, 500, 1800, U) == 448
    assert prompt_chunk_limit(448, U) == 64 and prompt_chunk_limit(512, U) == U


def test_rows_decoded_beside_other_requests_are_kept_as_they_are() -> None:
    """Their kernels are not known: nothing to gain by decoding them again."""
    assert exact_start(kinds((300, MIXED)), 299, 300, U) == 299


def test_cells_copied_back_in_another_layout_are_kept_as_they_are() -> None:
    """A sliding-window model's cells from host memory or disk (`MOVED`) never give a
    cold prefill's logits; decoding a short prompt's again on every hit from host
    memory cost Gemma 3 a third more TTFT at 8 streams, for nothing exact."""
    assert exact_start(kinds((25, MOVED)), 25, 1825, U) == 25
    assert exact_start(kinds((1830, MOVED)), 1824, 1825, U) == 1824


def test_a_sliding_window_prompt_settles_where_a_repeat_starts_decoding() -> None:
    """The cold prefill stops there for one step (`BatchedGenerator._settle_window`)
    without changing any row's kind, so a repeat restoring the copy made there and
    decoding the rest gets the cold logits."""
    # Last micro-batch of 313 rows: 249 then 64, both tiled.
    assert settle_point(1825, U) == 1825 - 64 == 1825 - repeat_tail(1825, U)
    # Of 30 rows (row by row): 28 then the last two, both row by row.
    assert settle_point(1054, U) == 1052
    # Of 100 rows: 36 then 64 would make the 36 row by row, not tiled: the whole micro-batch.
    assert settle_point(1124, U) == 1024
    # Of 3 rows: 1 then 2 would make the first one a split single row: the whole micro-batch.
    assert settle_point(1027, U) == 1024
    # Of one row: before it.
    assert settle_point(1025, U) == 1024
    for length in (1825, 1054, 1124, 1027, 1025, 600, 40):
        point = settle_point(length, U)
        last = length % U or U
        whole = row_kind(last, alone=True, first_row=length - last)
        assert length - point >= repeat_tail(length, U)
        if point > length - last:  # split: both parts keep the whole micro-batch's kind
            assert row_kind(point - (length - last), alone=True, first_row=length - last) == whole
            assert row_kind(length - point, alone=True, first_row=point) == whole
