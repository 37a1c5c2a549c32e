"""Continuous batching: `n_parallel` slots share one context and one decode per step.

A single decode thread owns the llama context. Each step it puts the next
token of every generating slot and chunks of pending prompts into one
`llama_batch`, runs one `llama_decode`, samples per slot, and hands text to the
waiting request handlers through their asyncio queues. Requests join between
steps.

A slot keeps its KV cells after its request ends (prompt caching, as
llama-server does): the next request goes to the idle slot whose cached tokens
share the longest prefix with its prompt, and only the rest of the prompt is
decoded. Multi-turn chats, which resend the whole conversation every turn, then
pay only for the new turn. Each slot has a KV stream of its own (`ctx_per_slot`
cells, `kv_unified` off), so the caches idle slots keep take no room and no
attention time from running requests.

A prompt with images (a model with a projector, runner/vision.py) is a token list in
which each image's KV cells are negative placeholder ids (`image_placeholders`). Its
text goes into the shared batch like any prompt's, up to the next image; the image
is decoded by libmtmd as a decode of its own between two steps, with the context's
whole n_batch (llama-server's split: the same logits). A cached prefix never ends
inside an image, and a follow-up turn that resends the same image reuses its cells.

Interactive first (docs/batch.md): a job marked `batch` (a Batch API line) is admitted
after every waiting interactive one, and its prompt fills the batch after theirs. An
interactive job that finds no idle slot takes a batch job's slot at once; the batch job
goes back to the front of the batch queue with what it has generated so far (`_Resume`:
its sampler, text and counters) and later continues from its prompt plus those tokens,
whose KV cells its slot's cache or the host cache mostly still hold. Its handler sees
one answer, as if nothing had happened. While an interactive job is in a slot, at most
`batch_share` batch jobs (-1: all) put tokens into a step; the others wait in their
slots, so that batch work does not slow the chat's steps down.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import llama_cpp
import numpy as np

from dmr_llamacpp.runner.burst import BURST_GAP_S, collect_burst
from dmr_llamacpp.runner.model import Batch, LoadedModel
from dmr_llamacpp.runner.prompt_cache import (
    HostPromptCache,
    common_prefix_length,
    copy_sequence_state,
    copy_serves_prefixes,
    kinds_as_restored,
    restore_sequence_state,
    window_reaches,
)
from dmr_llamacpp.runner.prompt_files import PromptFile, PromptFiles, SavedState
from dmr_llamacpp.runner.reasoning import THINK_CLOSE, THINK_OPEN, ThinkingBudget, partial_tag
from dmr_llamacpp.runner.row_kinds import (
    FLASH_ATTN_TILE_ROWS,
    MIXED,
    RowKinds,
    exact_start,
    prompt_chunk_limit,
    row_kind,
    settle_point,
)
from dmr_llamacpp.runner.sampling import SamplingParams, build_sampler_chain
from dmr_llamacpp.runner.slot_limit import SlotLimit
from dmr_llamacpp.runner.speculative import Drafter
from dmr_llamacpp.runner.text import StreamedText

if TYPE_CHECKING:  # libmtmd is loaded only for a model with a projector
    from dmr_llamacpp.runner.vision import MultimodalPrompt, VisionProjector

logger = logging.getLogger(__name__)

__all__ = [
    "BatchedGenerator",
    "Failed",
    "Finished",
    "GenerationJob",
    "GeneratorStats",
    "TextDelta",
    "TokenLogprob",
    "common_prefix_length",
    "hand_over",
    "image_placeholders",
]


# Fewer tokens than this are cheaper to decode again than to copy to host memory and back.
SAVE_AT_LEAST = 16
# The token a step decodes into an idle slot between busy ones (`_gap_fillers`): any id
# does, since its cell is taken out again before anything attends to it.
FILLER_TOKEN = 0

# A runner with a host cache copies its idle slots' caches there once no request has
# come for this long, one slot at a time, so that the burst which later takes those
# slots finds them copied already. Copying them when they are taken would put the
# copy on the burst's first-token path: llama_state_seq_get_data takes about 25 ms
# per 1,000 tokens of SmolLM2-135M here, and a burst of eight took up to 116 ms of
# copies before its first step (docs/benchmarks.md). Waiting first keeps the copy
# out of the way of a multi-turn chat's next turn, which comes within milliseconds.
IDLE_SAVE_AFTER_S = 0.05

# Batch jobs held back by `batch_share` stay held this long after the last interactive
# job left its slot: a client's or an agent's next request, which comes within tens of
# milliseconds of an answer, then finds the runner free rather than behind a step of
# batch work (82 ms for eight sequences of SmolLM2 on 2 CPU cores).
INTERACTIVE_GRACE_S = 0.1

# How long a stopping runner may spend writing its prompt caches to disk: the scheduler
# kills a runner 5 s after SIGTERM, and the server's graceful shutdown takes up to 2 s
# of that first (docs/scheduler.md).
SAVE_TO_DISK_S = 2.5

# An image's placeholder ids: -(1 + (id_hash << IMAGE_CELL_BITS) + cell), so two images
# differ from their first cell and the cell index says how far into its image a cell is.
IMAGE_CELL_BITS = 20
_IMAGE_CELL_MASK = (1 << IMAGE_CELL_BITS) - 1


def image_placeholders(image_id: str, n_cells: int) -> list[int]:
    """The placeholder ids of one image's KV cells in a slot's `tokens` (all negative:
    no vocabulary id matches one). `image_id` is libmtmd's (the SHA-256 of the file),
    so the same image in a later request gives the same ids and its cells are reused."""
    if n_cells > _IMAGE_CELL_MASK:
        raise ValueError(f"an image of {n_cells} tokens is more than the runner handles")
    # Without an id the image can match no other: a random key.
    seed = image_id.encode() if image_id else secrets.token_bytes(16)
    key = int.from_bytes(hashlib.sha256(seed).digest()[:5], "big")
    base = 1 + (key << IMAGE_CELL_BITS)
    return [-(base + cell) for cell in range(n_cells)]


def _cell_in_image(token: int) -> int:
    """How many cells of its image come before this placeholder's cell."""
    return (-token - 1) & _IMAGE_CELL_MASK


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: list[TokenLogprob]


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    prompt_ms: float
    predicted_ms: float
    # The stop string that ended generation, reported as llama-server's `stopping_word`
    # so dialects (Anthropic's stop_sequence) can tell it from an end-of-turn token.
    stop_word: str | None = None
    # Prompt tokens whose KV cells were reused from the slot's cache, not decoded.
    cached_tokens: int = 0


@dataclass(frozen=True)
class Failed:
    message: str


Event = TextDelta | Finished | Failed


@dataclass(frozen=True)
class SinkWake:
    """No event of the generation: it tells a stream's handler that the job's sink
    holds events or bytes for it to write (runner/direct_sink.py)."""


class EventSink(Protocol):
    """Takes a job's events in the decode thread (a stream written to its client's
    socket from there); returns what still goes to the handler's event loop."""

    def from_decode_thread(self, events: list[Event]) -> list[Event | SinkWake]: ...


@dataclass
class _Resume:
    """Where a preempted batch job stopped: what its slot held, to carry on from there."""

    tokens: list[int]  # its prompt, the tokens generated so far and the one sampled next
    sampler: Any  # the chain, with its penalties' history, grammar state and RNG
    completion_tokens: int
    text: StreamedText
    held_logprobs: list[TokenLogprob]
    started_at: float
    prompt_done_at: float
    cached_tokens: int
    think_left: int | None
    think_inside: bool
    think_tail: str
    forced: list[int]


class GenerationJob:
    """One request's generation; events arrive on `events` in the handler's event loop.

    A `batch` job (the server's `x-dmr-priority: batch`) runs only in the room
    interactive jobs leave; it may be preempted and resumed (`resume`). A `lone` job
    (`x-dmr-lone`) reached the server with no other near it: an idle runner does not
    wait for a burst behind it (`_take_incoming`).

    A prompt with images also has `media`, libmtmd's chunks (closed when the job ends),
    and `images`: the offset in `prompt` where each image's placeholders start, to the
    index of its chunk in `media.chunks`.
    """

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        media: MultimodalPrompt | None = None,
        images: dict[int, int] | None = None,
        batch: bool = False,
        lone: bool = False,
    ) -> None:
        self.prompt = prompt
        self.batch = batch
        # The server saw it come alone (`x-dmr-lone`): an idle runner starts it at once.
        self.lone = lone
        self.resume: _Resume | None = None  # set while preempted (the decode thread's)
        self.params = params
        self.media = media
        self.images: dict[int, int] = images or {}
        self.events: asyncio.Queue[Event | SinkWake] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.cancelled = False  # set by the handler, read by the decode thread
        self.submitted_at = time.perf_counter()
        self.outbox: list[Event] = []  # the decode thread's events not yet handed over
        self.thinking: ThinkingBudget | None = None  # None: thinking is not limited
        self.sink: EventSink | None = None  # set by the handler, read by the decode thread

    def cancel(self) -> None:
        self.cancelled = True


def _deliver(batch: list[tuple[GenerationJob, list[Event | SinkWake]]]) -> None:
    """Runs in the handlers' event loop: one call per loop and decode step."""
    for job, events in batch:
        for event in events:
            job.events.put_nowait(event)


def hand_over(job: GenerationJob, events: list[Event | SinkWake]) -> None:
    """From any thread: put `events` on the job's queue in its handler's event loop."""
    try:
        job.loop.call_soon_threadsafe(_deliver, [(job, events)])
    except RuntimeError:  # the handlers' loop is gone (shutdown)
        job.cancelled = True


@dataclass
class GeneratorStats:
    prompt_tokens_total: int = 0
    tokens_predicted_total: int = 0
    prompt_seconds_total: float = 0.0
    predicted_seconds_total: float = 0.0
    requests_processing: int = 0
    requests_deferred: int = 0
    kv_cells_used: int = 0
    kv_cells_total: int = 1
    decode_steps: int = 0
    max_batch_sequences: int = 0
    draft_tokens_total: int = 0
    draft_tokens_accepted_total: int = 0
    host_cache_prompts: int = 0
    host_cache_bytes: int = 0
    preemptions_total: int = 0  # batch jobs that gave their slot to an interactive one
    # Jobs an idle loop started without waiting for a burst: the server saw them alone.
    lone_starts_total: int = 0
    # Where a step's time goes: all of `_step` against the `llama_decode` inside it;
    # the difference is the Python around the decode (batch building, sampling).
    step_seconds_total: float = 0.0
    decode_seconds_total: float = 0.0
    batch_tokens_total: int = 0
    # Slots there are, and how many may hold a request now (runner/slot_limit.py).
    slots: int = 0
    slots_allowed: int = 0


@dataclass
class _Slot:
    seq_id: int
    job: GenerationJob | None = None
    sampler: Any = None
    n_past: int = 0
    tokens: list[int] = field(default_factory=list)  # what the KV cache holds, in order
    kinds: RowKinds = field(default_factory=RowKinds)  # the kernels that computed the cells
    pending_prompt: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled, not yet decoded
    output_index: int | None = None
    drafted: list[int] = field(default_factory=list)  # draft tokens decoded after next_token
    draft_indices: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    text: StreamedText | None = None
    held_logprobs: list[TokenLogprob] = field(default_factory=list)
    started_at: float = 0.0
    prompt_done_at: float = 0.0
    cached_tokens: int = 0  # of this job's prompt, reused from the cache
    last_used: float = 0.0  # when the slot last finished a job (least recently used goes first)
    # A thinking budget being counted (None: none, or spent): tokens left, whether the
    # model is inside `<think>`, the text tail a tag may straddle, and tokens to force.
    think_left: int | None = None
    think_inside: bool = False
    think_tail: str = ""
    forced: list[int] = field(default_factory=list)
    # The tokens an idle copy to host memory was last tried for (it may not fit).
    idle_save_tried: tuple[int, ...] = ()

    @property
    def busy(self) -> bool:
        return self.job is not None


class BatchedGenerator:
    """Owns the context through one thread; `submit` from any event loop."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        n_parallel: int,
        ctx_per_slot: int,
        drafter: Drafter | None = None,
        host_cache_bytes: int = 0,
        burst_gap_s: float = BURST_GAP_S,
        projector: VisionProjector | None = None,
        batch_share: int = -1,
        prompt_files: PromptFiles | None = None,
        adaptive_slots: bool = False,
    ) -> None:
        self.model = model
        if not model.can_cut_cache:
            # Every prompt's last token is decoded again for its logits, so a cache that
            # cannot be cut back is never reused: nothing is worth keeping or saving.
            host_cache_bytes, prompt_files = 0, None
        self.prompt_files = prompt_files
        self.batch_share = batch_share
        self._interactive_at = -math.inf  # when a step last held an interactive job
        self.projector = projector
        self.burst_gap_s = burst_gap_s
        self.host_cache = (
            HostPromptCache(model.ctx, model.memory, host_cache_bytes, model.n_swa)
            if host_cache_bytes > 0
            else None
        )
        self.drafter = drafter
        self.ctx_per_slot = ctx_per_slot
        self.n_batch = model.options.n_batch
        self.slots = [_Slot(seq_id=index) for index in range(n_parallel)]
        self.slot_limit = SlotLimit(n_parallel, adaptive_slots)
        self.stats = GeneratorStats(
            kv_cells_total=model.n_ctx, slots=n_parallel, slots_allowed=self.slot_limit.limit
        )
        self._decode_only_sequences = 0  # of the last step, when it only generated
        self._incoming: queue.Queue[GenerationJob | None] = queue.Queue()
        self._waiting: deque[GenerationJob] = deque()
        self._batch = Batch(self.n_batch)
        self._touched: list[GenerationJob] = []  # jobs with events in their outbox
        # Sequence id -> position of the throwaway token a step gave it (`_gap_fillers`).
        self._filled: dict[int, int] = {}
        self._stopping = False
        if prompt_files is not None:  # before the decode thread owns the context
            self._restore_from_disk(prompt_files)
        self._thread = threading.Thread(target=self._run, name="llama-decode", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, job: GenerationJob) -> None:
        if len(job.prompt) >= self.ctx_per_slot:
            raise ValueError(
                f"the prompt has {len(job.prompt)} tokens, more than the context size "
                f"of {self.ctx_per_slot} tokens allows"
            )
        if job.images and (self.projector is None or job.media is None):
            raise ValueError("a prompt with images needs the model's projector")
        self._incoming.put(job)

    def close(self) -> None:
        deadline = time.monotonic() + SAVE_TO_DISK_S
        self._stopping = True
        self._incoming.put(None)
        self._thread.join(timeout=10)
        if self.prompt_files is not None and not self._thread.is_alive():
            try:
                self._save_to_disk(self.prompt_files, deadline)
            except Exception as error:  # never in the way of stopping
                logger.warning("could not save the prompt caches: %r", error)
        for slot in self.slots:
            self._release(slot)
        for job in self._waiting:
            self._drop_resume(job)
        self._flush_events()
        self._batch.free()
        if self.drafter is not None:
            self.drafter.close()

    # ------------------------------------------------------------------ disk

    def _restore_from_disk(self, files: PromptFiles) -> None:
        """Read the prompts an earlier runner saved back into the slots, newest first,
        then into the host cache while it has room."""
        now = time.perf_counter()
        empty = list(self.slots)
        for_host: list[PromptFile] = []
        host_bytes = 0
        restored = 0
        for saved in files.load():
            if len(saved.tokens) >= self.ctx_per_slot:
                continue
            if empty:
                slot = empty[0]
                if not restore_sequence_state(
                    self.model.ctx, self.model.memory, saved.state, slot.seq_id
                ):
                    logger.warning(
                        "ignoring the saved prompt cache %s: llama.cpp refused it", saved.path
                    )
                    saved.path.unlink(missing_ok=True)
                    continue
                empty.pop(0)
                slot.tokens = list(saved.tokens)
                slot.kinds = RowKinds(saved.kinds)
                slot.n_past = len(slot.tokens)
                slot.last_used = now - restored * 1e-3  # older files go first
            elif self.host_cache is not None and host_bytes + saved.state.nbytes <= (
                self.host_cache.budget_bytes
            ):
                for_host.append(saved)
                host_bytes += saved.state.nbytes
            else:
                break
            files.touch(saved.path)
            restored += 1
        for saved in reversed(for_host):  # the host cache's newest entry comes last
            assert self.host_cache is not None
            self.host_cache.keep(saved.tokens, saved.state, saved.kinds)
        if restored:
            logger.info("restored %d saved prompt caches from %s", restored, files.folder)
        self._note_host_cache()

    def _save_to_disk(self, files: PromptFiles, deadline: float) -> None:
        """Write the slots' caches and the host cache's, most recently used first,
        leaving out any that a more recent one extends (it serves their requests)."""
        chosen: list[SavedState] = []

        def extended(tokens: tuple[int, ...]) -> bool:
            return any(
                other.tokens[: len(tokens)] == tokens
                and copy_serves_prefixes(self.model.n_swa, len(other.tokens))
                for other in chosen
            )

        for slot in sorted(self.slots, key=lambda slot: -slot.last_used):
            tokens = tuple(slot.tokens)
            # Image placeholders stand for cells that only their image's id can match.
            if len(tokens) < SAVE_AT_LEAST or min(tokens) < 0 or extended(tokens):
                continue
            state = copy_sequence_state(self.model.ctx, slot.seq_id, files.max_bytes)
            if state is not None:
                kinds = kinds_as_restored(slot.kinds, len(tokens), self.model.n_swa)
                chosen.append(SavedState(tokens, state, kinds))
        if self.host_cache is not None:
            for entry in self.host_cache.newest_first():
                if min(entry.tokens) >= 0 and not extended(entry.tokens):
                    chosen.append(SavedState(entry.tokens, entry.state, entry.kinds))
        if chosen:
            written = files.save(chosen, deadline)
            logger.info("saved %d prompt caches to %s", written, files.folder)

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        while not self._stopping:
            busy = any(slot.busy for slot in self.slots)
            unsaved = None if busy or self._waiting else self._unsaved_idle_slot()
            if unsaved is not None:
                if not self._take_incoming(block=True, first_timeout_s=IDLE_SAVE_AFTER_S):
                    self._save_idle(unsaved)
                    continue
            else:
                # Idle with requests already waiting (a wave of streams beyond the slots
                # whose slots just freed) is no reason to wait for another: blocking here
                # held them up to 0.5 s between every two waves.
                self._take_incoming(block=not busy and not self._waiting)
            self._drop_cancelled()
            self._admit_waiting()
            if any(slot.busy for slot in self.slots):
                held_back = self._held_back()
                pause = self._pause_left(held_back)
                try:
                    if pause > 0:  # only held batch work: wait for the chat's next turn
                        self._take_incoming(block=True, first_timeout_s=pause)
                    else:
                        self._step(held_back)
                except Exception as error:  # keep serving; fail the slots in this step
                    for slot in self.slots:
                        if slot.busy:
                            self._fail(slot, f"generation failed: {error}")
            self._flush_events()
            self._note_host_cache()

    def _note_host_cache(self) -> None:
        if self.host_cache is not None:
            self.stats.host_cache_prompts = len(self.host_cache)
            self.stats.host_cache_bytes = self.host_cache.bytes_used

    def _emit(self, job: GenerationJob, event: Event) -> None:
        if not job.outbox:
            self._touched.append(job)
        job.outbox.append(event)

    def _flush_events(self) -> None:
        """Hand the step's events over with one wake-up per event loop.

        Waking the handlers' loop once per token would have it take the GIL back
        while this thread still samples the other slots, and every ctypes call
        here would then wait for it; after the step, the handlers run while the
        next `llama_decode` holds no GIL.
        """
        if not self._touched:
            return
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[GenerationJob, list[Event | SinkWake]]]
        ] = {}
        for job in self._touched:
            events, job.outbox = job.outbox, []
            sink = job.sink  # a stream this thread writes itself takes its events here
            handed = (
                cast("list[Event | SinkWake]", events)
                if sink is None
                else sink.from_decode_thread(events)
            )
            if handed:
                by_loop.setdefault(job.loop, []).append((job, handed))
        self._touched = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the handlers' loop is gone (shutdown)
                for job, _events in batch:
                    job.cancelled = True

    def _unsaved_idle_slot(self) -> _Slot | None:
        """An idle slot whose cache is worth a copy in host memory and has none yet."""
        if self.host_cache is None:
            return None
        for slot in sorted(self.slots, key=lambda slot: slot.last_used):
            if slot.busy or len(slot.tokens) < SAVE_AT_LEAST:
                continue
            key = tuple(slot.tokens)
            if key != slot.idle_save_tried and key not in self.host_cache:
                return slot
        return None

    def _save_idle(self, slot: _Slot) -> None:
        assert self.host_cache is not None
        slot.idle_save_tried = tuple(slot.tokens)
        self.host_cache.save(slot.seq_id, slot.tokens, slot.kinds)
        self._note_host_cache()

    def _take_incoming(self, *, block: bool, first_timeout_s: float | None = None) -> bool:
        """Move submitted jobs to `_waiting`, saying whether any came; when idle
        (`block`), wait for the first one (up to `first_timeout_s`, else until it
        comes) and then for the burst it may open (`collect_burst`), unless the server
        saw it come alone (`GenerationJob.lone`, dmr/server/arrivals.py).

        An idle runner sleeps until a request comes: it used to wake every 0.5 s to
        look, and the first `llama_decode` after a few such wake-ups took 28 ms
        instead of 18 on the 0.6B model, 41 instead of 28 to the first token
        (docs/benchmarks.md, "The first step after an idle spell"). Stopping puts a
        None on the queue, so nothing is missed."""
        try:
            first = (
                self._incoming.get(timeout=first_timeout_s)
                if block
                else self._incoming.get_nowait()
            )
        except queue.Empty:
            return False
        if block and not (first is not None and first.lone and not self._waiting):
            # Up to the open slots, not all of them: with 32 slots and 8 open, a burst
            # of 8 waited out the follow gap (25 ms) after its last request, for
            # requests that would have had no slot (docs/benchmarks.md).
            open_slots = self.slot_limit.limit - sum(slot.busy for slot in self.slots)
            room = max(1, open_slots - len(self._waiting))
            jobs = collect_burst(self._incoming, first, limit=room, gap_s=self.burst_gap_s)
        else:  # busy, or a lone job (the server saw no burst): what is here already
            if block:
                self.stats.lone_starts_total += 1
            jobs = [first]
            while jobs[-1] is not None and not self._incoming.empty():
                jobs.append(self._incoming.get_nowait())
        for job in jobs:
            if job is None:
                self._stopping = True
                return True
            self._waiting.append(job)
        return True

    def _drop_cancelled(self) -> None:
        for job in self._waiting:
            if job.cancelled:
                self._drop_resume(job)
        self._waiting = deque(job for job in self._waiting if not job.cancelled)
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                # Between steps every token in `tokens` has been decoded: worth keeping.
                self._release(slot, keep_cache=True)

    def _admit_waiting(self) -> None:
        while self._waiting:
            job = self._next_waiting()
            prompt = job.prompt if job.resume is None else job.resume.tokens
            room = sum(slot.busy for slot in self.slots) < self.slot_limit.limit
            # A prompt that must not use the cache should not take a slot whose cache it
            # would destroy for nothing: it goes to the fresh slot, as an unmatched prompt.
            slot = (
                self._pick_slot(prompt if job.params.cache_prompt or job.resume else [])
                if room
                else None
            )
            if slot is None and not job.batch:
                slot = self._preempt_batch_slot()
            if slot is None:
                if not room and self.slot_limit.grow():
                    continue  # `slots_allowed` is set once the loop ends
                break
            self._waiting.remove(job)
            if job.resume is not None:
                self._resume(slot, job, job.resume)
                continue
            try:
                slot.sampler = build_sampler_chain(
                    job.params,
                    self.model.vocab,
                    self.model.n_vocab,
                    history=job.prompt,
                    n_ctx=self.ctx_per_slot,
                )
            except ValueError as error:
                self._emit(job, Failed(str(error)))
                continue
            slot.job = job
            self._reuse_prefix(
                slot,
                job.prompt,
                use_cache=job.params.cache_prompt,
                exact=job.params.reproducible,
            )
            slot.next_token = None
            slot.completion_tokens = 0
            slot.text = StreamedText(job.params.stop)
            slot.held_logprobs = []
            slot.forced = []
            budget = job.thinking
            slot.think_left = None if budget is None else budget.tokens
            slot.think_inside = budget is not None and budget.inside
            slot.think_tail = ""
            if budget is not None and budget.inside and budget.tokens <= 0:
                slot.forced, slot.think_left = list(budget.close), None
            slot.started_at = time.perf_counter()
            slot.prompt_done_at = 0.0
        self.stats.requests_deferred = len(self._waiting)
        self.stats.requests_processing = sum(slot.busy for slot in self.slots)
        self.slot_limit.settle(self.stats.requests_processing, len(self._waiting))
        self.stats.slots_allowed = self.slot_limit.limit

    def _next_waiting(self) -> GenerationJob:
        """The first waiting interactive job, else the first batch one (a preempted
        batch job is put back first in line)."""
        return next((job for job in self._waiting if not job.batch), self._waiting[0])

    def _preempt_batch_slot(self) -> _Slot | None:
        """Free a slot for an interactive job by preempting a batch job, or None when
        every slot holds an interactive one.

        The batch job with the fewest cells in its slot goes: the least to decode again
        should its cache be lost. A job with images is never preempted (its images
        would have to be decoded again, and their chunks kept meanwhile).
        """
        candidates = [
            slot
            for slot in self.slots
            if slot.job is not None and slot.job.batch and not slot.job.images
        ]
        if not candidates:
            return None
        slot = min(candidates, key=lambda slot: (len(slot.tokens), -slot.started_at))
        job = slot.job
        assert job is not None and slot.text is not None
        if slot.next_token is not None:  # generating: it carries on from here later
            job.resume = _Resume(
                tokens=[*slot.tokens, slot.next_token],
                sampler=slot.sampler,
                completion_tokens=slot.completion_tokens,
                text=slot.text,
                held_logprobs=slot.held_logprobs,
                started_at=slot.started_at,
                prompt_done_at=slot.prompt_done_at,
                cached_tokens=slot.cached_tokens,
                think_left=slot.think_left,
                think_inside=slot.think_inside,
                think_tail=slot.think_tail,
                forced=slot.forced,
            )
            slot.sampler = None  # kept for the resume, not freed with the slot
        # else still reading its prompt: it starts again, the part decoded stays cached.
        # The cells stay for now: the interactive prompt cuts only what it does not
        # share, and a cut of SAVE_AT_LEAST tokens or more goes to the host cache.
        self._release(slot, keep_cache=True)
        self._waiting.appendleft(job)
        self.stats.preemptions_total += 1
        return slot

    def _resume(self, slot: _Slot, job: GenerationJob, resume: _Resume) -> None:
        """Give a preempted batch job `slot` again, as it was when it left its own."""
        job.resume = None
        slot.job = job
        self._reuse_prefix(slot, resume.tokens)
        slot.sampler = resume.sampler
        slot.next_token = None
        slot.completion_tokens = resume.completion_tokens
        slot.text = resume.text
        slot.held_logprobs = resume.held_logprobs
        slot.forced = resume.forced
        slot.think_left = resume.think_left
        slot.think_inside = resume.think_inside
        slot.think_tail = resume.think_tail
        slot.started_at = resume.started_at
        slot.prompt_done_at = resume.prompt_done_at
        slot.cached_tokens = resume.cached_tokens

    def _drop_resume(self, job: GenerationJob) -> None:
        """Free the sampler a preempted job that will not run again kept."""
        if job.resume is not None:
            llama_cpp.llama_sampler_free(job.resume.sampler)
            job.resume = None

    def _pick_slot(self, prompt: list[int]) -> _Slot | None:
        """The idle slot whose cache serves `prompt` best, weighing what it would destroy.

        The candidates are the slot sharing the longest prefix with the prompt
        (worth it from a tenth of the prompt, llama-server's similarity rule) and
        the fresh one: an empty slot, else the least recently used. The best match
        wins unless the fresh slot keeps much more of the other caches: the tokens
        the best match would cut beyond the shared prefix count a quarter each,
        as most of them are a finished answer that only a follow-up turn reuses.
        Without the weighing, two prompts that share only a system prompt take each
        other's slots and both lose their caches.
        """
        # Only the first `limit` slots: llama.cpp's attention spans every KV stream from
        # the lowest to the highest sequence id in a batch, so eight sequences spread
        # over 32 streams took 47 ms a step of SmolLM2 against 28 ms packed in eight
        # (bench/decode_batch_cost.py, "spread" against "streams").
        idle = [slot for slot in self.slots[: self.slot_limit.limit] if not slot.busy]
        if not idle:
            return None
        fresh = min(idle, key=lambda slot: (bool(slot.tokens), slot.last_used))
        shared = {id(slot): self._usable_prefix(slot, prompt) for slot in idle}
        best = max(idle, key=lambda slot: (shared[id(slot)], -slot.last_used))
        if shared[id(best)] * 10 < len(prompt):
            return fresh
        gained = shared[id(best)] - shared[id(fresh)]
        cut = (len(best.tokens) - shared[id(best)]) - (len(fresh.tokens) - shared[id(fresh)])
        return best if gained * 4 >= cut else fresh

    def _reuse_prefix(
        self, slot: _Slot, prompt: list[int], *, use_cache: bool = True, exact: bool = False
    ) -> None:
        """Keep the cells the slot's cache shares with `prompt`; queue the rest for decoding.

        A cache about to be cut goes to host memory first (when at least
        `SAVE_AT_LEAST` of its tokens would be lost); a prompt saved there that
        shares more with `prompt` than the slot does is copied into the slot.
        Without `use_cache` (the request's `cache_prompt: false`), or with a cache that
        cannot be cut back (`LoadedModel.can_cut_cache`), nothing is reused. An `exact`
        request (greedy or seeded) gets a cold prefill's logits where that costs at
        most 64 rows more (row_kinds.py).
        """
        use_cache = use_cache and self.model.can_cut_cache
        common = self._usable_prefix(slot, prompt) if use_cache else 0
        if self.host_cache is not None:
            saved, shared = self.host_cache.best_match(prompt) if use_cache else (None, 0)
            if len(slot.tokens) - common >= SAVE_AT_LEAST:
                self.host_cache.save(slot.seq_id, slot.tokens, slot.kinds)
            if saved is not None and shared > common:
                if self.host_cache.restore(saved, slot.seq_id, keeps=shared):
                    slot.tokens, common = list(saved.tokens), shared
                    slot.kinds = RowKinds(saved.kinds)
                else:  # nothing of the slot's own cache is known to be left
                    self.model.forget_sequence(slot.seq_id)
                    slot.tokens, common = [], 0
        # At least the prompt's last token is decoded again: its logits pick the first token.
        common = min(common, len(prompt) - 1)
        lowest = self.model.lowest_position(slot.seq_id) if self.model.n_swa else 0
        if not window_reaches(self.model.n_swa, lowest, common):
            common = 0  # (a restored copy that llama.cpp cut short: never seen so far)
        if exact and self.model.n_gpu_layers == 0:
            # A few rows more, where that makes the logits a cold prefill's (row_kinds.py;
            # a GPU's kernels were not measured).
            start = exact_start(slot.kinds, common, len(prompt), self.model.options.n_ubatch)
            if common - start <= FLASH_ATTN_TILE_ROWS and window_reaches(
                self.model.n_swa, lowest, start
            ):
                common = start
        if self.projector is not None and common:
            common = self._image_safe_prefix(slot.tokens, common)
        if common < len(slot.tokens):
            if not llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, common, -1):
                # The cells could not be cut there: the whole prompt is decoded again, as
                # decoding on from `common` would fail (or answer from the wrong state).
                self.model.forget_sequence(slot.seq_id)
                common = 0
            del slot.tokens[common:]
        slot.n_past = common
        slot.cached_tokens = common
        slot.pending_prompt = list(prompt[common:])

    def _usable_prefix(self, slot: _Slot, prompt: list[int]) -> int:
        """How many tokens of `prompt` the slot's cells serve: the prefix they share,
        or none where a sliding window dropped cells the rest would attend to (a slot
        holding a copy from host memory or disk: `window_reaches`)."""
        shared = common_prefix_length(slot.tokens, prompt)
        if shared and self.model.n_swa:
            lowest = self.model.lowest_position(slot.seq_id)
            if not window_reaches(self.model.n_swa, lowest, min(shared, len(prompt) - 1)):
                return 0
        return shared

    def _settle_window(self, slot: _Slot) -> None:
        """Copy a sliding-window model's prompt, decoded up to the rows a repeat of it
        decodes again (`_settles_at`), to host memory, and set its cells back from
        that copy.

        A copy keeps only the window's cells, which come back at the start of the
        stream: a layout the kernels sum in another order than the cells had in place,
        and the copy lacks what a prefix of it would attend to (`window_reaches`). So
        a prompt's saves after its answer (`kinds_as_restored`: `MOVED`) can neither
        serve the same prompt again nor give its cold answer. This copy can: its
        tokens are the prompt's but those last rows, and the prompt goes on over the
        very layout that restoring it gives, here, after an unload (written to
        disk with the host cache) or in another slot. A repeated greedy prompt then
        gets the cold answer bit for bit (docs/scheduler.md).
        """
        assert self.host_cache is not None
        state = copy_sequence_state(self.model.ctx, slot.seq_id, self.host_cache.budget_bytes)
        if state is None:
            return
        if not restore_sequence_state(self.model.ctx, self.model.memory, state, slot.seq_id):
            # Never seen: the cells are gone, so the prompt is decoded again from the start.
            assert slot.job is not None
            slot.tokens, slot.kinds, slot.n_past, slot.cached_tokens = [], RowKinds(), 0, 0
            slot.pending_prompt = list(slot.job.prompt)
            return
        self.host_cache.keep(tuple(slot.tokens), state, slot.kinds.as_list(len(slot.tokens)))
        self._note_host_cache()

    def _settles_at(self, slot: _Slot) -> int:
        """Where the slot's prompt is copied and goes on over the copy (`_settle_window`):
        a sliding-window model's prompt longer than its window, before the rows that a
        repeat of the prompt decodes again (row_kinds.settle_point); 0: nowhere."""
        if self.host_cache is None or not self.model.n_swa or slot.job is None:
            return 0
        point = settle_point(len(slot.job.prompt), self.model.options.n_ubatch)
        return point if point > self.model.n_swa else 0

    def _image_safe_prefix(self, tokens: list[int], common: int) -> int:
        """`common` moved back to the start of the image it would cut (the cells of a
        half-kept image would be wrong), or with M-RoPE (an image takes fewer positions
        than cells, so past one cells stop being positions) to the first image."""
        if self.projector is not None and self.projector.uses_mrope:
            return next((index for index in range(common) if tokens[index] < 0), common)
        if common < len(tokens) and tokens[common] < 0:
            return common - _cell_in_image(tokens[common])
        return common

    def _text_before_image(self, slot: _Slot) -> int:
        """How many of the slot's pending prompt tokens come before its next image."""
        job = slot.job
        assert job is not None
        at = len(job.prompt) - len(slot.pending_prompt)
        following = [offset for offset in job.images if offset >= at]
        return min(following) - at if following else len(slot.pending_prompt)

    def _decode_images(self, held_back: set[int]) -> None:
        """Decode each slot's image that is next in its prompt, one decode per image
        (llama_decode cannot mix embeddings and token ids in one batch), but for the
        slots `held_back` this step."""
        if self.projector is None:  # a text-only model: every step, so kept cheap
            return
        for slot in self.slots:
            job = slot.job
            if job is None or not job.images or not slot.pending_prompt:
                continue
            if slot.seq_id in held_back:
                continue
            if slot.pending_prompt[0] >= 0 or job.cancelled:
                continue
            assert self.projector is not None and job.media is not None
            at = len(job.prompt) - len(slot.pending_prompt)
            index = job.images.get(at)
            if index is None:  # a placeholder that starts no image: the prompt is wrong
                self._fail(slot, f"prompt position {at} holds no image")
                continue
            n_cells = job.media.chunks[index].n_tokens
            # The other slots' tokens of this step go out first: an image takes a while.
            self._flush_events()
            started = time.perf_counter()
            try:
                slot.n_past = self.projector.eval_chunk(
                    self.model.ctx,
                    job.media,
                    index,
                    n_past=slot.n_past,
                    seq_id=slot.seq_id,
                    n_batch=self.n_batch,
                )
            except (RuntimeError, ValueError) as error:
                self._fail(slot, f"decoding the image failed: {error}")
                continue
            self.stats.prompt_seconds_total += time.perf_counter() - started
            self.stats.prompt_tokens_total += n_cells
            slot.kinds.write(len(slot.tokens), n_cells, MIXED)
            slot.tokens.extend(slot.pending_prompt[:n_cells])
            slot.pending_prompt = slot.pending_prompt[n_cells:]

    def _held_back(self) -> set[int]:
        """The seq_ids of batch jobs that sit this step out: past `batch_share` while
        an interactive job is in a slot, or left one less than `INTERACTIVE_GRACE_S`
        ago (the oldest batch jobs go first)."""
        if self.batch_share < 0:
            return set()
        jobs = [(slot, slot.job) for slot in self.slots if slot.job is not None]
        now = time.perf_counter()
        if not all(job.batch for _slot, job in jobs):
            self._interactive_at = now
        elif now - self._interactive_at >= INTERACTIVE_GRACE_S:
            return set()
        batch = sorted((slot for slot, job in jobs if job.batch), key=lambda s: s.started_at)
        return {slot.seq_id for slot in batch[self.batch_share :]}

    def _pause_left(self, held_back: set[int]) -> float:
        """Seconds to wait before a step when every busy slot is held back (0: step)."""
        if not held_back or any(slot.busy and slot.seq_id not in held_back for slot in self.slots):
            return 0.0
        return max(0.0, self._interactive_at + INTERACTIVE_GRACE_S - time.perf_counter())

    def _step(self, held_back: set[int]) -> None:
        started = time.perf_counter()
        self._decode_only_sequences = 0
        try:
            self._build_and_decode(held_back)
        finally:
            elapsed = time.perf_counter() - started
            self.stats.step_seconds_total += elapsed
        # What a step of this many sequences costs, Python around the decode included.
        self.slot_limit.record(self._decode_only_sequences, elapsed)
        self.stats.slots_allowed = self.slot_limit.limit

    def _build_and_decode(self, held_back: set[int]) -> None:
        drafts = self._propose_drafts(held_back)
        batch = self._batch
        batch.clear()
        for slot in self.slots:
            slot.output_index = None
            slot.drafted = []
            slot.draft_indices = []
        generating = [
            slot
            for slot in self.slots
            if slot.seq_id not in held_back and slot.busy and slot.next_token is not None
        ]
        generated = sum(1 + len(drafts.get(slot.seq_id, ())) for slot in generating)
        # Room kept for a throwaway token in every slot that may sit between two in the
        # batch (`_gap_fillers`); none for a prompt alone, whose chunks then end where
        # a cold prefill's micro-batches do (row_kinds.py).
        prefilling = self._prefilling(held_back)
        gaps = len(self.slots) - len(generating) if len(generating) + len(prefilling) > 1 else 0
        chunks = self._prompt_chunks(prefilling, batch.capacity - generated - gaps)
        # In ascending sequence ids: llama.cpp splits a batch over per-slot KV streams
        # into ubatches of consecutive, increasing ids only (llama_batch_allocr::
        # split_equal), one pass over the weights each. Prompts taken in arrival order
        # (ids 0, 1, 4, 7, 3, 2, 6, 5) ran a burst's first step as five passes: twice a
        # whole step's time on the 0.6B model (docs/benchmarks.md).
        prefilled = [slot for slot in self.slots if slot.seq_id in chunks]
        in_batch = sorted([*generating, *prefilled], key=lambda slot: slot.seq_id)
        planned = generated + sum(len(chunk) for chunk in chunks.values())
        fillers = self._gap_fillers(in_batch, batch.capacity - planned)
        prompt_tokens_in_step = 0
        first_rows = {slot.seq_id: len(slot.tokens) for slot in in_batch}
        for slot in sorted([*in_batch, *fillers], key=lambda slot: slot.seq_id):
            if slot.seq_id in self._filled:
                batch.add(FILLER_TOKEN, self._filled[slot.seq_id], slot.seq_id, wants_logits=False)
                continue
            chunk = chunks.get(slot.seq_id)
            if chunk is None:
                self._add_generated(slot, drafts.get(slot.seq_id, ()))
                continue
            slot.pending_prompt = slot.pending_prompt[len(chunk) :]
            for offset, token in enumerate(chunk):
                last = offset == len(chunk) - 1 and not slot.pending_prompt
                index = batch.add(token, slot.n_past, slot.seq_id, wants_logits=last)
                slot.tokens.append(token)
                slot.n_past += 1
                if last:
                    slot.output_index = index
            prompt_tokens_in_step += len(chunk)
        if batch.n_tokens == 0:
            self._decode_images(held_back)
            return
        started = time.perf_counter()
        try:
            status = batch.decode(self.model)
        finally:
            self._drop_fillers()
        elapsed = time.perf_counter() - started
        if status != 0:
            reason = "no room left in the KV cache" if status == 1 else f"llama_decode={status}"
            # The failed decode left the cache as it was; these slots' `tokens` are not in it.
            for slot in in_batch:
                self._fail(slot, f"decode failed: {reason}")
            return
        alone = len(in_batch) == 1
        for slot in in_batch:
            rows = len(slot.tokens) - first_rows[slot.seq_id]
            first = first_rows[slot.seq_id]
            slot.kinds.write(first, rows, row_kind(rows, alone=alone, first_row=first))
        for slot in prefilled:
            if slot.pending_prompt and len(slot.tokens) == self._settles_at(slot):
                self._settle_window(slot)
        sampled = [slot for slot in self.slots if slot.busy and slot.output_index is not None]
        tokens = batch.n_tokens - len(fillers)
        if prompt_tokens_in_step == 0 and tokens == len(sampled):  # no prompt, no draft
            self._decode_only_sequences = len(sampled)
        self.stats.decode_steps += 1
        self.stats.decode_seconds_total += elapsed
        self.stats.batch_tokens_total += tokens
        self.stats.max_batch_sequences = max(self.stats.max_batch_sequences, len(sampled))
        self.stats.prompt_tokens_total += prompt_tokens_in_step
        if tokens:
            share = elapsed * prompt_tokens_in_step / tokens
            self.stats.prompt_seconds_total += share
            self.stats.predicted_seconds_total += elapsed - share
        for slot in sampled:
            if slot.drafted:
                self._verify(slot)
            else:
                self._sample(slot)
        self._decode_images(held_back)
        self.stats.kv_cells_used = sum(len(slot.tokens) for slot in self.slots)
        self.stats.requests_processing = sum(slot.busy for slot in self.slots)

    def _gap_fillers(self, in_batch: list[_Slot], room: int) -> list[_Slot]:
        """The slots between the batch's lowest and highest sequence id that have nothing
        in it, each to get one throwaway token (`FILLER_TOKEN`, no logits) at the end of
        its cells, taken out again right after the decode (`_drop_fillers`).

        llama.cpp splits a batch over per-slot KV streams into ubatches of consecutive
        sequence ids only: slots 0-2 and 4-7 ran as two passes over the weights, 105 ms
        a step on the 0.6B model against 69 for 0-7 (docs/benchmarks.md). A token costs
        far less than a pass. Not for a cache that cannot drop a token again
        (`LoadedModel.can_cut_cache`), one that is full, or one holding an image (whose
        positions are not its cell count); none when they do not fit in `room`."""
        self._filled = {}
        if len(in_batch) < 2 or not self.model.can_cut_cache:
            return []
        taken = {slot.seq_id for slot in in_batch}
        fillers = [
            slot
            for slot in self.slots[in_batch[0].seq_id : in_batch[-1].seq_id]
            if slot.seq_id not in taken
            and len(slot.tokens) < self.ctx_per_slot
            and (not slot.tokens or min(slot.tokens) >= 0)
        ]
        if len(fillers) > room:
            return []  # the batch runs in several passes: slower, not wrong
        self._filled = {slot.seq_id: len(slot.tokens) for slot in fillers}
        return fillers

    def _drop_fillers(self) -> None:
        for seq_id, position in self._filled.items():
            llama_cpp.llama_memory_seq_rm(self.model.memory, seq_id, position, -1)
        self._filled = {}

    def _add_generated(self, slot: _Slot, drafted: Sequence[int]) -> None:
        """A generating slot's next token, and the drafts the target checks with it."""
        batch = self._batch
        assert slot.next_token is not None
        slot.output_index = batch.add(slot.next_token, slot.n_past, slot.seq_id, wants_logits=True)
        slot.tokens.append(slot.next_token)
        slot.n_past += 1
        slot.next_token = None
        for token in drafted:
            slot.draft_indices.append(batch.add(token, slot.n_past, slot.seq_id, wants_logits=True))
            slot.drafted.append(token)
            slot.tokens.append(token)
            slot.n_past += 1

    def _prefilling(self, held_back: set[int]) -> list[_Slot]:
        """The slots with prompt tokens left to decode, but those `held_back`."""
        return [
            slot
            for slot in self.slots
            if slot.job is not None and slot.pending_prompt and slot.seq_id not in held_back
        ]

    def _prompt_chunks(self, prefilling: list[_Slot], room: int) -> dict[int, list[int]]:
        """The prompt tokens each of the `prefilling` slots (by sequence id) decodes
        this step, within `room`: oldest request first, interactive ones before batch
        work."""
        chunks: dict[int, list[int]] = {}
        for slot in sorted(
            prefilling, key=lambda slot: (slot.job is not None and slot.job.batch, slot.started_at)
        ):
            if room <= 0:
                break
            # Micro-batches that end where a cold prefill's do (row_kinds.py).
            take = min(room, prompt_chunk_limit(len(slot.tokens), self.model.options.n_ubatch))
            settles_at = self._settles_at(slot)
            if settles_at > len(slot.tokens):
                take = min(take, settles_at - len(slot.tokens))
            if slot.job is not None and slot.job.images:
                take = min(take, self._text_before_image(slot))
                if take == 0:  # an image is next: decoded after this step
                    continue
            chunk = chunks[slot.seq_id] = slot.pending_prompt[:take]
            room -= len(chunk)
        return chunks

    def _propose_drafts(self, held_back: set[int]) -> dict[int, list[int]]:
        """Draft tokens per generating slot (but those `held_back`), within the batch's
        room and each slot's limits."""
        if self.drafter is None:
            return {}
        # Not for prompts with images: the draft model has no projector to read them.
        generating = [
            slot
            for slot in self.slots
            if slot.busy
            and slot.next_token is not None
            and slot.job is not None
            and not slot.job.images
            and slot.seq_id not in held_back
        ]
        if not generating:
            return {}
        share = self.n_batch // len(generating) - 1
        requests = {}
        for slot in generating:
            assert slot.job is not None and slot.next_token is not None
            limit = min(self.drafter.max_tokens, share, self.ctx_per_slot - slot.n_past - 2)
            if slot.job.params.max_tokens is not None:
                limit = min(limit, slot.job.params.max_tokens - slot.completion_tokens - 1)
            if limit > 0:
                requests[slot.seq_id] = ([*slot.tokens, slot.next_token], limit)
        if not requests:
            return {}
        started = time.perf_counter()
        try:
            drafts = self.drafter.propose(requests)
        except RuntimeError:
            return {}  # the target alone still answers; speculation is only a speed-up
        finally:
            # Drafting is part of generating: tokens/s figures must include it.
            self.stats.predicted_seconds_total += time.perf_counter() - started
        self.stats.draft_tokens_total = self.drafter.proposed_total
        return drafts

    def _verify(self, slot: _Slot) -> None:
        """Sample at each drafted position; keep drafts while the target agrees with them."""
        drafted = slot.drafted
        indices = [slot.output_index, *slot.draft_indices]
        first_position = slot.n_past - len(indices)
        accepted = 0
        for position, index in enumerate(indices):
            slot.output_index = index
            slot.n_past = first_position + position + 1
            if not self._sample(slot):
                return  # finished: the slot's cache is dropped whole
            if position < len(drafted) and slot.next_token == drafted[position]:
                accepted += 1
                slot.next_token = None  # already decoded, as the next position's input
                continue
            break
        if self.drafter is not None:
            self.drafter.accepted_total += accepted
            self.stats.draft_tokens_accepted_total = self.drafter.accepted_total
        # Rejected drafts leave the KV cache; the sampled token is decoded next step.
        llama_cpp.llama_memory_seq_rm(self.model.memory, slot.seq_id, slot.n_past, -1)
        del slot.tokens[slot.n_past :]

    def _sample(self, slot: _Slot) -> bool:
        """Sample one token; False when the slot finished (stop, length) instead."""
        job = slot.job
        assert job is not None and slot.output_index is not None and slot.text is not None
        now = time.perf_counter()
        if not slot.prompt_done_at:
            slot.prompt_done_at = now
        params = job.params
        raw_logits = self.model.logits(slot.output_index) if params.logprobs is not None else None
        if slot.forced:
            # The close of a thinking cut short: written for the model, not sampled (the
            # sampler's grammar and penalties do not see it).
            token = slot.forced.pop(0)
        else:
            greedy = self.model.greedy_token(slot.output_index) if params.plain_greedy else None
            token = (
                int(llama_cpp.llama_sampler_sample(slot.sampler, self.model.ctx, slot.output_index))
                if greedy is None
                else greedy  # the chain is `greedy` alone, which keeps no state to accept
            )
        # Counted before the end-of-generation check: llama-server counts the end token
        # in `completion_tokens` too (its `n_decoded`), and usage must match it.
        slot.completion_tokens += 1
        self.stats.tokens_predicted_total += 1
        if self.model.is_end_of_generation(token) and not params.ignore_eos:
            self._finish(slot, "stop")
            return False
        piece = self.model.piece(token)
        if raw_logits is not None:
            slot.held_logprobs.append(
                self._logprob_entry(raw_logits, token, piece, params.logprobs)
            )
        if slot.think_left is not None:
            self._count_thinking(slot, job, piece)
        text = slot.text.push(piece)
        if text:
            self._emit(job, TextDelta(text, slot.held_logprobs))
            slot.held_logprobs = []
        if slot.text.stopped_by is not None:
            self._finish(slot, "stop")
            return False
        if params.max_tokens is not None and slot.completion_tokens >= params.max_tokens:
            self._finish(slot, "length")
            return False
        if slot.n_past + 1 >= self.ctx_per_slot:
            self._finish(slot, "length")
            return False
        slot.next_token = token
        return True

    def _count_thinking(self, slot: _Slot, job: GenerationJob, piece: bytes) -> None:
        """Count a thinking token against the budget; once it is spent, the close tag
        is forced as the next tokens and the model goes on with its answer."""
        assert slot.think_left is not None and job.thinking is not None
        tail = slot.think_tail + piece.decode("utf-8", "replace")
        if not slot.think_inside:
            at = tail.find(THINK_OPEN)
            if at < 0:
                slot.think_tail = tail[-len(THINK_OPEN) :]
                return
            slot.think_inside = True
            tail = tail[at + len(THINK_OPEN) :]
            if tail:  # a token that opens the thinking and starts it counts
                slot.think_left -= 1
        else:
            slot.think_left -= 1
        if THINK_CLOSE in tail:  # the model closed it itself: nothing more to count
            slot.think_left, slot.think_tail = None, ""
            return
        slot.think_tail = tail[-len(THINK_CLOSE) :]
        # A model halfway through writing `</think>` itself is let finish it.
        if slot.think_left <= 0 and not partial_tag(slot.think_tail, THINK_CLOSE):
            slot.forced, slot.think_left = list(job.thinking.close), None

    def _logprob_entry(
        self, logits: np.ndarray, token: int, piece: bytes, top_n: int | None
    ) -> TokenLogprob:
        shifted = logits - logits.max()
        log_probs = shifted - math.log(float(np.exp(shifted).sum()))
        top: list[tuple[str, float, list[int]]] = []
        if top_n:
            for candidate in np.argpartition(-log_probs, top_n)[:top_n]:
                candidate_piece = self.model.piece(int(candidate))
                top.append(
                    (
                        candidate_piece.decode("utf-8", errors="replace"),
                        float(log_probs[candidate]),
                        list(candidate_piece),
                    )
                )
            top.sort(key=lambda item: -item[1])
        return TokenLogprob(
            token=piece.decode("utf-8", errors="replace"),
            logprob=float(log_probs[token]),
            bytes=list(piece),
            top=top,
        )

    def _finish(self, slot: _Slot, reason: str) -> None:
        job = slot.job
        assert job is not None and slot.text is not None
        tail = slot.text.finish()
        if tail or slot.held_logprobs:
            self._emit(job, TextDelta(tail, slot.held_logprobs))
        now = time.perf_counter()
        prompt_done = slot.prompt_done_at or now
        self._emit(
            job,
            Finished(
                reason=reason,
                prompt_tokens=len(job.prompt),
                completion_tokens=slot.completion_tokens,
                prompt_ms=(prompt_done - slot.started_at) * 1000,
                predicted_ms=(now - prompt_done) * 1000,
                stop_word=slot.text.stopped_by,
                cached_tokens=slot.cached_tokens,
            ),
        )
        self._release(slot, keep_cache=True)

    def _fail(self, slot: _Slot, message: str) -> None:
        if slot.job is not None:
            self._emit(slot.job, Failed(message))
        self._release(slot)

    def _release(self, slot: _Slot, *, keep_cache: bool = False) -> None:
        """End the slot's job. With `keep_cache` its KV cells (all decoded: `tokens`)
        stay for the next request that shares their prefix."""
        if slot.sampler is not None:
            llama_cpp.llama_sampler_free(slot.sampler)
            slot.sampler = None
        if slot.job is not None and slot.job.media is not None:
            slot.job.media.close()  # libmtmd's copy of the images: not needed any more
        if not keep_cache:
            if slot.tokens or slot.job is not None or slot.n_past:
                self.model.forget_sequence(slot.seq_id)
            slot.tokens = []
            if self.drafter is not None:
                self.drafter.forget(slot.seq_id)
        slot.last_used = time.perf_counter()
        slot.job = None
        slot.n_past = len(slot.tokens)
        slot.drafted = []
        slot.draft_indices = []
        slot.pending_prompt = []
        slot.next_token = None
        slot.output_index = None
