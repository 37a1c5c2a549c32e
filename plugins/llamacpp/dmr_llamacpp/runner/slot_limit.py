"""How many of a runner's slots take requests at once, sized by what a step costs.

A runner started with `--adaptive-slots` (the engine's default when nobody set
`--parallel`, docs/scheduler.md "More streams than slots") holds more slots than
it first lets requests into. Every slot's KV stream is allocated at load, so no
request can fail for memory; what more slots can cost is time. On two CPU cores
one decode of SmolLM2 gives 286 tokens/s with 8 sequences, 338 with 16 and 360
with 32 (`llama_decode` alone), a 0.6B model 119, 162 and 181: a bigger batch
pays, but less and less, and on a slower machine or a bigger model it may not
pay at all, while every stream in it gets slower.

So the limit starts at `START_SLOTS` and doubles, up to the slots there are, only
while requests wait for a slot and the step cost measured at the limit says the
bigger batch still pays: the tokens a second of decode-only steps with twice the
sequences must reach `PAYS` times those with the current count. Once a doubling
did not pay, the limit steps back and tries again after `RETRY_AFTER_S` (other
runners may have taken cores meanwhile, or given them back).

When demand falls to a quarter of the limit with nobody waiting, it steps back too,
so that the requests that come next are packed into the first slots (llama.cpp's
attention spans every stream between a batch's lowest and highest sequence id);
the next wave opens them again, each measured afresh.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# llama-server's --parallel that the benches tune; also dmr's fixed default.
START_SLOTS = 8
# A doubling of the batch must give this much more throughput to be kept. Low: the
# requests it lets in would otherwise wait a whole answer for a slot, and SmolLM2's
# 8 -> 16 on two cores, 1.18x in `llama_decode` alone, measured 1.05-1.15x with the
# server and 16 clients on the same cores (bench/llamacpp_concurrency.py).
PAYS = 1.05
# A size is judged by the median of its last this many decode-only steps: a median,
# because the first step of a new batch shape (llama.cpp plans its graph again) and a
# step that shared the cores with a burst of arriving requests are outliers.
STEPS_TO_JUDGE = 8
RETRY_AFTER_S = 30.0


@dataclass
class SlotLimit:
    """The number of slots that may hold a request now (`limit`)."""

    slots: int
    adaptive: bool
    limit: int = field(init=False)
    _rates: dict[int, deque[float]] = field(default_factory=dict, init=False)
    # Sizes measured not to pay, and when they may be tried again. Only those: a
    # doubling that paid opens at once in the next wave.
    _retry_at: dict[int, float] = field(default_factory=dict, init=False)
    _grown_from: list[int] = field(default_factory=list, init=False)  # earlier limits
    # A doubling is judged once, on its first steps against the size measured just
    # before: later in a wave the answers are longer and every step slower, so a rate
    # measured then, set against one from the start, would shut a doubling that paid.
    _judging: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.limit = min(START_SLOTS, self.slots) if self.adaptive else self.slots

    def rate(self, sequences: int) -> float | None:
        """Tokens a second of decode-only steps with `sequences` sequences (the median
        of the last `STEPS_TO_JUDGE`), once that many were measured."""
        rates = self._rates.get(sequences)
        if rates is None or len(rates) < STEPS_TO_JUDGE:
            return None
        return statistics.median(rates)

    def record(self, sequences: int, seconds: float, *, now: float | None = None) -> None:
        """A step that only generated (one token per sequence, no prompt, no draft)."""
        if not self.adaptive or sequences <= 0 or seconds <= 0:
            return
        now = time.monotonic() if now is None else now
        rates = self._rates.setdefault(sequences, deque(maxlen=STEPS_TO_JUDGE))
        rates.append(sequences / seconds)
        self._judge(now)

    def _judge(self, now: float) -> None:
        """Step back from a doubling measured not to pay."""
        if not self._grown_from or not self._judging:
            return
        smaller = self._grown_from[-1]
        at_limit, below = self.rate(self.limit), self.rate(smaller)
        if at_limit is None or below is None:
            return
        self._judging = False
        if at_limit < PAYS * below:
            self._retry_at[self.limit] = now + RETRY_AFTER_S
            logger.info(
                "%d slots gave %.0f tokens/s, %d gave %.0f: back to %d for %.0f s",
                self.limit,
                at_limit,
                smaller,
                below,
                smaller,
                RETRY_AFTER_S,
            )
            self.limit = self._grown_from.pop()

    def grow(self, *, now: float | None = None) -> bool:
        """Requests wait with every allowed slot busy: double the limit if that may pay.

        It may once the current size has been measured, unless twice the size was
        measured not to pay less than `RETRY_AFTER_S` ago.
        """
        if not self.adaptive or self.limit >= self.slots:
            return False
        if self.rate(self.limit) is None:
            return False
        now = time.monotonic() if now is None else now
        bigger = min(self.limit * 2, self.slots)
        if now < self._retry_at.get(bigger, 0.0):
            return False
        # Judged on fresh steps only: a rate kept from another wave was measured with
        # other prompts, clients and neighbours on the cores.
        self._rates.pop(bigger, None)
        self._grown_from.append(self.limit)
        self._judging = True
        logger.info(
            "requests wait with %d slots busy (%.0f tokens/s): opening %d",
            self.limit,
            self.rate(self.limit) or 0.0,
            bigger,
        )
        self.limit = bigger
        return True

    def settle(self, busy: int, waiting: int) -> None:
        """Step back one doubling when nobody waits and three quarters of the open
        slots are idle (a quarter, not a half: a steady load at half the limit would
        otherwise step back and grow again with every request)."""
        if self._grown_from and waiting == 0 and busy <= self.limit // 4:
            self.limit = self._grown_from.pop()
            self._judging = False
