"""How many slots take requests at once (runner/slot_limit.py): from 8, doubled while
requests wait and the step cost measured says the bigger batch pays. Step times are
given here, so the rule is checked exactly; the real runner's use of it is checked
with 32 streams in test_llamacpp_runner.py."""

from __future__ import annotations

from dmr_llamacpp.runner.slot_limit import RETRY_AFTER_S, STEPS_TO_JUDGE, SlotLimit


def steps(limit: SlotLimit, sequences: int, tokens_per_second: float, now: float = 0.0) -> None:
    for _ in range(STEPS_TO_JUDGE):
        limit.record(sequences, sequences / tokens_per_second, now=now)


def test_fixed_slots_are_all_open_and_never_change() -> None:
    limit = SlotLimit(slots=4, adaptive=False)
    assert limit.limit == 4
    assert not limit.grow(now=0)
    steps(limit, 4, 100)
    assert limit.limit == 4


def test_it_starts_at_eight_and_grows_only_once_eight_were_measured() -> None:
    limit = SlotLimit(slots=32, adaptive=True)
    assert limit.limit == 8
    assert not limit.grow(now=0)  # nothing measured yet: no reason to believe more pays
    limit.record(8, 8 / 280, now=0)
    assert not limit.grow(now=0)  # one step is no measure
    steps(limit, 8, 280)
    assert limit.grow(now=0) and limit.limit == 16


def test_a_doubling_that_pays_is_kept_and_the_next_one_tried() -> None:
    limit = SlotLimit(slots=32, adaptive=True)
    steps(limit, 8, 286)
    assert limit.grow(now=0)
    steps(limit, 16, 338)  # SmolLM2 on two cores: 1.18x
    assert limit.limit == 16
    assert limit.grow(now=0) and limit.limit == 32
    steps(limit, 32, 370)  # 1.09x
    assert limit.limit == 32
    assert not limit.grow(now=0)  # every slot is open


def test_a_doubling_that_does_not_pay_steps_back_and_is_tried_again_later() -> None:
    limit = SlotLimit(slots=32, adaptive=True)
    steps(limit, 8, 100, now=0)
    assert limit.grow(now=0)
    steps(limit, 16, 103, now=1)  # 1.03x: every stream slower for nothing
    assert limit.limit == 8
    assert not limit.grow(now=1 + RETRY_AFTER_S - 1)
    assert limit.grow(now=2 + RETRY_AFTER_S) and limit.limit == 16
    assert limit.rate(16) is None  # the old measure is dropped, not averaged in
    steps(limit, 16, 150, now=40)  # the machine changed: now it pays
    assert limit.limit == 16


def test_steps_of_other_sizes_do_not_judge_the_limit() -> None:
    limit = SlotLimit(slots=16, adaptive=True)
    steps(limit, 8, 200)
    assert limit.grow(now=0)
    steps(limit, 12, 50)  # a wave ending: fewer sequences than the limit
    assert limit.limit == 16
    assert limit.rate(12) is not None and limit.rate(16) is None


def test_fewer_slots_than_eight_are_all_open() -> None:
    limit = SlotLimit(slots=4, adaptive=True)
    assert limit.limit == 4
    steps(limit, 4, 100)
    assert not limit.grow(now=0)


def test_when_demand_falls_the_limit_steps_back_and_reopens_at_once() -> None:
    limit = SlotLimit(slots=32, adaptive=True)
    steps(limit, 8, 286)
    assert limit.grow(now=0)
    steps(limit, 16, 338)
    assert limit.grow(now=0)
    steps(limit, 32, 380)
    limit.settle(busy=20, waiting=0)
    assert limit.limit == 32
    limit.settle(busy=2, waiting=3)  # requests wait: no step back
    assert limit.limit == 32
    # The wave ends: next requests go to the first slots again.
    limit.settle(busy=8, waiting=0)
    assert limit.limit == 16
    limit.settle(busy=0, waiting=0)
    assert limit.limit == 8
    # The next wave: eight was measured, so sixteen opens at once; thirty-two once
    # sixteen is measured again in this wave.
    assert limit.grow(now=1) and limit.limit == 16
    assert not limit.grow(now=1)
    steps(limit, 16, 330)
    assert limit.grow(now=1) and limit.limit == 32


def test_one_slow_step_does_not_shut_a_doubling_that_pays() -> None:
    """The first step of a new batch shape is slow (llama.cpp plans its graph again):
    the median of the steps judges, not a mean the outlier drags down."""
    limit = SlotLimit(slots=32, adaptive=True)
    steps(limit, 8, 286)
    assert limit.grow(now=0)
    limit.record(16, 16 / 100, now=0)
    for _ in range(STEPS_TO_JUDGE - 1):
        limit.record(16, 16 / 338, now=0)
    assert limit.limit == 16


def test_a_size_that_did_not_pay_keeps_shut_only_itself() -> None:
    """32 did not pay over 16: the next wave still opens 16 at once, not 32."""
    limit = SlotLimit(slots=32, adaptive=True)
    steps(limit, 8, 250)
    assert limit.grow(now=0)
    steps(limit, 16, 330)
    assert limit.grow(now=0)
    steps(limit, 32, 335, now=1)  # 1.02x over 16
    assert limit.limit == 16
    limit.settle(busy=0, waiting=0)
    assert limit.limit == 8
    assert limit.grow(now=2) and limit.limit == 16
    steps(limit, 16, 330, now=2)
    assert not limit.grow(now=3)  # 32 stays shut until its retry
    assert limit.grow(now=1 + RETRY_AFTER_S) and limit.limit == 32


def test_a_doubling_is_judged_once_on_its_first_steps() -> None:
    """Later in a wave every step is slower (longer answers to attend over): 16 measured
    then is not held against 8 measured at the wave's start."""
    limit = SlotLimit(slots=16, adaptive=True)
    steps(limit, 8, 324)
    assert limit.grow(now=0)
    steps(limit, 16, 379)  # judged: 1.17x, kept
    steps(limit, 16, 336)  # the wave's tail
    assert limit.limit == 16
