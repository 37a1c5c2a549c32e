"""A loaded GGUF and one llama context, through llama-cpp-python's low-level API.

The high-level `llama_cpp.Llama` owns one sequence at a time; continuous
batching needs the context, the vocabulary and `llama_batch` directly.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np

if TYPE_CHECKING:
    from dmr_llamacpp.runner.free_cores import FreeCores

__all__ = ["ContextOptions", "LoadedModel", "silence_llama_logs"]

_LOG_CALLBACK: Any = None
# ggml's levels in the llama.cpp this package builds (ggml.h; llama-cpp-python's own
# comment gives an older numbering): a continuation line takes its line's level.
_GGML_LOG_WARN = 3
_GGML_LOG_ERROR = 4
_GGML_LOG_CONT = 5


def silence_llama_logs() -> None:
    """Keep llama.cpp's warnings and errors on stderr (the scheduler reports them)."""
    global _LOG_CALLBACK
    verbose = os.environ.get("LOG_LEVEL", "").lower() == "debug"
    kept = False  # whether the line a continuation belongs to was kept

    def forward(level: int, text: bytes, _user_data: Any) -> None:
        nonlocal kept
        if level != _GGML_LOG_CONT:
            kept = verbose or level in (_GGML_LOG_WARN, _GGML_LOG_ERROR)
        if kept:
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    # The callback must outlive every llama call, so it is kept in a module global.
    _LOG_CALLBACK = llama_cpp.llama_log_callback(forward)
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


@dataclass(frozen=True)
class ContextOptions:
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_seq_max: int
    threads: int
    threads_batch: int
    embeddings: bool = False
    pooling_type: int = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
    flash_attn: int = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    type_k: int = llama_cpp.GGML_TYPE_F16
    type_v: int = llama_cpp.GGML_TYPE_F16
    # One KV pool for all sequences (pooling: every input whole in one context), or a
    # stream of n_ctx / n_seq_max cells per sequence (generation, as llama-server with
    # --parallel): attention then spans only the sequence's own cells, so the caches
    # that idle slots keep for later requests cost the running ones nothing.
    kv_unified: bool = True


class LoadedModel:
    """Model weights, vocabulary and a single context shared by every slot."""

    def __init__(
        self,
        path: Path,
        options: ContextOptions,
        *,
        n_gpu_layers: int = 0,
        use_mmap: bool = True,
        use_mlock: bool = False,
        extra_buffers: bool | None = None,
    ) -> None:
        """`extra_buffers`: llama.cpp's AMX and repacked weight buffers; None uses them
        where this build of llama.cpp runs them without crashing (runner/extra_buffers.py)."""
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        model_params.load_mode = (
            llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK
            if use_mmap and use_mlock
            else llama_cpp.LLAMA_LOAD_MODE_MLOCK
            if use_mlock
            else llama_cpp.LLAMA_LOAD_MODE_MMAP
            if use_mmap
            else llama_cpp.LLAMA_LOAD_MODE_NONE
        )
        if extra_buffers is None:
            from dmr_llamacpp.runner.extra_buffers import extra_buffers_usable

            extra_buffers = extra_buffers_usable(path, offloading=n_gpu_layers > 0)
        model_params.use_extra_bufts = extra_buffers
        self.n_gpu_layers = n_gpu_layers
        self.extra_buffers = extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"failed to load model {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._logits_row = ctypes.c_float * self.n_vocab
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.metadata = self._read_metadata()

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = options.n_ctx
        params.n_batch = options.n_batch
        params.n_ubatch = options.n_ubatch
        params.n_seq_max = options.n_seq_max
        params.n_threads = options.threads
        params.n_threads_batch = options.threads_batch
        params.embeddings = options.embeddings
        params.pooling_type = options.pooling_type
        params.flash_attn_type = options.flash_attn
        params.type_k = options.type_k
        params.type_v = options.type_v
        params.kv_unified = options.kv_unified
        params.no_perf = True
        self.options = options
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError("failed to create the llama context (out of memory?)")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        # Recurrent and hybrid models (Mamba, Granite 4.0 H, LFM2, ...) keep one state per
        # sequence, not a cell per token: their cache can be dropped whole but not cut
        # back to a shared prefix (llama_memory_seq_rm says no), so no prompt is reused.
        self.can_cut_cache = not (
            llama_cpp.llama_model_is_recurrent(self.model)
            or llama_cpp.llama_model_is_hybrid(self.model)
        )
        # The positions a sliding-window layer attends to before a row's own (Gemma 2
        # and 3, gpt-oss, ...; 0: none). Such a sequence's copy holds only the window of
        # its last position (prompt_cache.window_reaches).
        self.n_swa = int(llama_cpp.llama_model_n_swa(self.model))
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        # (threads, threads_batch) llama_decode computes with now, and the count asked
        # for by `share_threads`, taken up by the decoding thread before its next batch.
        self.threads = (options.threads, options.threads_batch)
        self._wanted_threads: tuple[int, int] | None = None
        self._share = self.threads  # the counts the scheduler's share allows
        # Set by the runner when it yields cores that other processes keep busy
        # (runner/free_cores.py); sampled and read by the decoding thread only.
        self.free_cores: FreeCores | None = None
        self.yielded_steps = 0  # steps computed with fewer threads than the share
        self._piece_buffer = ctypes.create_string_buffer(256)

    def share_threads(self, busy_runners: int) -> tuple[int, int]:
        """Compute with the loaded thread counts divided by `busy_runners`, the runners
        computing on these cores now (at least one thread); says what it will use.

        llama.cpp's threads spin at the barrier after every matrix product: two runners
        with a thread per core each on the same cores hold a core while they spin and
        their other thread waits for it (SmolLM2 on 2 cores: 12 ms a step alone, 78 ms
        each side by side, 18 ms each with one thread each; docs/scheduler.md).
        """
        wanted = (
            max(1, self.options.threads // busy_runners),
            max(1, self.options.threads_batch // busy_runners),
        )
        self._wanted_threads = wanted
        return wanted

    def apply_thread_share(self) -> None:
        """Take up the thread count `share_threads` asked for, fewer while other processes
        keep cores busy (`free_cores`); decoding thread only."""
        wanted, self._wanted_threads = self._wanted_threads, None
        if wanted is not None:
            self._share = wanted
        threads = self._share
        if self.free_cores is not None:
            free = self.free_cores.free()
            if free < max(threads):
                threads = (min(threads[0], free), min(threads[1], free))
                self.yielded_steps += 1
        if threads != self.threads:
            llama_cpp.llama_set_n_threads(self.ctx, *threads)
            self.threads = threads

    def sample_free_cores(self, batch_tokens: int) -> None:
        """After a decode of `batch_tokens` tokens: what other processes run now
        (llama.cpp computes a one-token batch with `threads`, others with `threads_batch`)."""
        if self.free_cores is not None:
            self.free_cores.sample(self.threads[0] if batch_tokens == 1 else self.threads[1])

    # ------------------------------------------------------------------ metadata

    def _read_metadata(self) -> dict[str, str]:
        found: dict[str, str] = {}
        buffer = ctypes.create_string_buffer(1 << 17)
        for index in range(llama_cpp.llama_model_meta_count(self.model)):
            if llama_cpp.llama_model_meta_key_by_index(self.model, index, buffer, len(buffer)) < 0:
                continue
            key = buffer.value.decode("utf-8", errors="replace")
            size = llama_cpp.llama_model_meta_val_str_by_index(
                self.model, index, buffer, len(buffer)
            )
            if size < 0:
                continue
            found[key] = buffer.value.decode("utf-8", errors="replace")
        return found

    @property
    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    @property
    def n_cls_out(self) -> int:
        return int(llama_cpp.llama_model_n_cls_out(self.model))

    def token_text(self, token: int) -> str:
        return self.detokenize([token], special=True)

    @property
    def bos_token(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self.vocab))

    @property
    def eos_token(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self.vocab))

    @property
    def sep_token(self) -> int:
        return int(llama_cpp.llama_vocab_sep(self.vocab))

    @property
    def adds_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))

    @property
    def adds_eos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_eos(self.vocab))

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, add_special, parse_special
        )
        if count < 0:
            capacity = -count
            tokens = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, parse_special
            )
        return list(tokens[:count])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token; may be part of a multi-byte UTF-8 character."""
        size = llama_cpp.llama_token_to_piece(
            self.vocab, token, self._piece_buffer, len(self._piece_buffer), 0, special
        )
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -size, 0, special)
            return buffer.raw[:size]
        return self._piece_buffer.raw[:size]

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.piece(token, special=special) for token in tokens).decode(
            "utf-8", errors="replace"
        )

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def greedy_token(self, output_index: int) -> int | None:
        """The token llama.cpp's greedy sampler picks for one batch output: the first
        of the highest logits (None: ask the sampler chain, for an output without
        logits or a NaN among the highest, where the two would differ).

        `llama_sampler_sample` first copies every logit into a candidate array of
        n_vocab entries and scans that; after a decode has swept the caches it took
        0.12 ms a step for a 49,152-token vocabulary in the runner (docs/benchmarks.md,
        session 24). Reading the logits in place took 0.04 ms there."""
        logits = self._logits_in_place(output_index)
        if logits is None:
            return None
        token = int(logits.argmax())
        return None if math.isnan(logits[token]) else token

    def logits(self, output_index: int) -> np.ndarray:
        """A copy of the raw logits of one batch output (before any sampler)."""
        logits = self._logits_in_place(output_index)
        if logits is None:
            raise RuntimeError(f"batch output {output_index} has no logits")
        return logits.copy()

    def _logits_in_place(self, output_index: int) -> np.ndarray | None:
        """The context's own logits of one batch output, valid until the next decode
        (None: the output has none)."""
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, output_index)
        if not pointer:
            return None
        return np.frombuffer(
            self._logits_row.from_address(ctypes.addressof(pointer.contents)), dtype=np.float32
        )

    def embedding(self, seq_id: int, size: int) -> np.ndarray:
        pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, seq_id)
        if not pointer:
            raise RuntimeError("the context produced no pooled embedding")
        return np.ctypeslib.as_array(pointer, shape=(size,)).copy()

    # ------------------------------------------------------------------ memory

    def lowest_position(self, seq_id: int) -> int:
        """The lowest position whose cells the sequence holds in every layer (0 when
        empty): above 0 only in a sliding-window model's sequence copied back from host
        memory or disk."""
        return max(0, int(llama_cpp.llama_memory_seq_pos_min(self.memory, seq_id)))

    def forget_sequence(self, seq_id: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def forget_all(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


class Batch:
    """A reusable `llama_batch` filled token by token (one sequence id per token)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0

    def add(self, token: int, position: int, seq_id: int, *, wants_logits: bool) -> int:
        """Append a token and return its index in the batch (the output index if it has logits)."""
        index = self.n_tokens
        self.raw.token[index] = token
        self.raw.pos[index] = position
        self.raw.n_seq_id[index] = 1
        self.raw.seq_id[index][0] = seq_id
        self.raw.logits[index] = wants_logits
        self.n_tokens += 1
        return index

    @property
    def room(self) -> int:
        return self.capacity - self.n_tokens

    def decode(self, model: LoadedModel) -> int:
        model.apply_thread_share()
        self.raw.n_tokens = self.n_tokens
        status = int(llama_cpp.llama_decode(model.ctx, self.raw))
        model.sample_free_cores(self.n_tokens)
        if status == 0:
            # On a GPU llama_decode only queues the work; sampling would wait for it
            # anyway, and waiting here makes the step's decode time what it really is.
            llama_cpp.llama_synchronize(model.ctx)
        return status

    def free(self) -> None:
        llama_cpp.llama_batch_free(self.raw)
