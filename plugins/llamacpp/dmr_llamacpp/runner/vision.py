"""Images in prompts: a projector (mmproj) loaded through libmtmd, llama-cpp-python's
`llama_cpp.mtmd_cpp` bindings.

libmtmd turns a prompt text holding one media marker per image into chunks: runs of
text tokens and image chunks (the embeddings the projector makes from one image,
each taking a KV cell and, except with M-RoPE, a position). `VisionProjector.tokenize`
does that as `llama-server --mmproj` does (same decoder, same preprocessing, same
special-token handling), and `VisionProjector.eval` puts the chunks into one
sequence of a context, the prefill of one slot.

Everything the C side could abort the process on (GGML_ASSERT) is checked here first
and raised as a Python exception instead: a sequence id the context does not have, a
batch larger than the context's `n_batch`, and an image that needs non-causal
attention but does not fit one micro-batch.
"""

from __future__ import annotations

import ctypes
import hashlib
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np

__all__ = [
    "ImageChunk",
    "InvalidImageError",
    "MultimodalPrompt",
    "TextChunk",
    "VisionProjector",
    "default_marker",
    "image_id",
    "set_mtmd_log_callback",
]

# Kept in a module global: libmtmd calls it for as long as the process lives.
_LOG_CALLBACK: Any = None
# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last line).
_GGML_LOG_WARN = 3
_GGML_LOG_ERROR = 4
_GGML_LOG_CONT = 5


def set_mtmd_log_callback(write: Callable[[int, str], None] | None = None) -> None:
    """Route libmtmd's and clip's log lines (they have their own logger, not llama's).

    `write(level, text)` gets every line, continuation lines (CONT) with the level of
    the line they continue. Without it only warnings and errors are kept, on stderr:
    libmtmd logs several INFO lines per image and per decode.
    """
    global _LOG_CALLBACK

    def default(level: int, text: str) -> None:
        if level >= _GGML_LOG_WARN:
            sys.stderr.write(text)

    sink = write or default
    last_level = [0]

    def forward(level: int, text: bytes, _user_data: Any) -> None:
        if level == _GGML_LOG_CONT:
            level = last_level[0]
        last_level[0] = level
        sink(level, text.decode("utf-8", errors="replace"))

    _LOG_CALLBACK = llama_cpp.llama_log_callback(forward)
    # mtmd_helper_log_set also sets libmtmd's (and so clip's) logger.
    mtmd.mtmd_helper_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def default_marker() -> str:
    """libmtmd's default media marker (`<__media__>`): one in the prompt per image."""
    return bytes(mtmd.mtmd_default_marker()).decode()


class InvalidImageError(ValueError):
    """The bytes are not an image this projector can take (corrupt, unknown format,
    audio or video), or the prompt's markers do not match its images."""


@dataclass(frozen=True)
class TextChunk:
    """Text tokens, one KV cell and one position each."""

    tokens: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ImageChunk:
    """One image's embeddings: `n_tokens` KV cells, `n_pos` positions (fewer with M-RoPE).

    `image_id` is libmtmd's id for the image: the SHA-256 of its file bytes, the key
    llama-server's prompt cache compares images by. `handle` is the
    `mtmd_input_chunk *`, valid while `owner` (the prompt it came from) is open; the
    chunk keeps that prompt alive.
    """

    n_tokens: int
    n_pos: int
    image_id: str
    handle: int
    owner: MultimodalPrompt = field(repr=False, compare=False)


Chunk = TextChunk | ImageChunk


class _LibmtmdObject:
    """Owns one libmtmd pointer, freed once by `close()` or on leaving a `with`."""

    _freed_message = "the libmtmd object was freed"

    def __init__(self, handle: int) -> None:
        self._handle: int | None = handle

    def _free(self, handle: int) -> None:
        raise NotImplementedError

    @property
    def handle(self) -> int:
        if self._handle is None:
            raise RuntimeError(self._freed_message)
        return self._handle

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        if self._handle is not None:
            self._free(self._handle)
            self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class MultimodalPrompt(_LibmtmdObject):
    """A tokenized prompt with images: owns libmtmd's `mtmd_input_chunks`.

    Freed by `close()` (or when garbage collected); its `ImageChunk` handles are
    invalid after that.
    """

    _freed_message = "the prompt's chunks were freed"

    def __init__(self, raw: int) -> None:
        super().__init__(raw)
        self.chunks: list[Chunk] = []
        for index in range(mtmd.mtmd_input_chunks_size(raw)):
            chunk = mtmd.mtmd_input_chunks_get(raw, index)
            if not chunk:
                raise RuntimeError(f"libmtmd returned no chunk {index}")
            kind = mtmd.mtmd_input_chunk_get_type(chunk)
            if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t(0)
                tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                self.chunks.append(TextChunk([int(tokens[i]) for i in range(count.value)]))
            elif kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                raw_id = mtmd.mtmd_input_chunk_get_id(chunk)
                self.chunks.append(
                    ImageChunk(
                        n_tokens=int(mtmd.mtmd_input_chunk_get_n_tokens(chunk)),
                        n_pos=int(mtmd.mtmd_input_chunk_get_n_pos(chunk)),
                        image_id=bytes(raw_id).decode() if raw_id else "",
                        handle=int(chunk),
                        owner=self,
                    )
                )
            else:  # audio: the vision-only wrapper rejects audio bitmaps before this
                raise InvalidImageError("only images are supported")

    @property
    def n_tokens(self) -> int:
        """KV cells the prompt takes (llama-server's prompt_tokens count)."""
        return sum(chunk.n_tokens for chunk in self.chunks)

    @property
    def n_pos(self) -> int:
        """Positions the prompt advances n_past by (equal to n_tokens without M-RoPE)."""
        return sum(chunk.n_pos for chunk in self.chunks)

    @property
    def images(self) -> list[ImageChunk]:
        return [chunk for chunk in self.chunks if isinstance(chunk, ImageChunk)]

    def _free(self, handle: int) -> None:
        mtmd.mtmd_input_chunks_free(handle)

    def __del__(self) -> None:
        self.close()


class VisionProjector(_LibmtmdObject):
    """A projector GGUF loaded for one text model (libmtmd's `mtmd_context`).

    `model` is the text model's `llama_model *` (`LoadedModel.model`, or
    `llama_cpp.Llama(...).model`); it must outlive the projector. `tokenize` is
    thread-safe (libmtmd says so of decoding, preprocessing and tokenizing), so
    request handlers can run it; encoding and evaluation are not (libmtmd keeps the
    last encoded image's embeddings in the context), so one thread, the decode
    thread, does those.
    """

    _freed_message = "the projector was closed"

    def __init__(
        self,
        path: Path,
        model: Any,
        *,
        n_threads: int,
        use_gpu: bool = False,
        flash_attn_type: int = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
        warmup: bool = True,
        media_marker: str | None = None,
    ) -> None:
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.flash_attn_type = flash_attn_type
        params.warmup = warmup
        # ctypes keeps no reference to a c_char_p field's bytes: held on self.
        self._marker_bytes = (media_marker or default_marker()).encode()
        params.media_marker = self._marker_bytes
        self.path = path
        handle = mtmd.mtmd_init_from_file(str(path).encode(), model, params)
        if not handle:
            raise RuntimeError(
                f"failed to load the projector {path} (a projector of another model, "
                "or not a projector: the log above tells which)"
            )
        super().__init__(handle)
        self._lock = threading.Lock()
        self.marker = self._marker_bytes.decode()
        self.supports_vision = bool(mtmd.mtmd_support_vision(handle))
        if not self.supports_vision:
            self.close()
            raise RuntimeError(f"{path} has no vision encoder")
        # Gemma 3-style projectors decode image embeddings with non-causal attention:
        # the whole image must then fit one micro-batch (n_ubatch).
        self.non_causal = bool(mtmd.mtmd_decode_use_non_causal(handle, None))
        # Qwen-VL style M-RoPE: an image takes fewer positions than KV cells.
        self.uses_mrope = bool(mtmd.mtmd_decode_use_mrope(handle))
        # The width of one image embedding: the text model's input embedding width.
        self.n_embd = int(llama_cpp.llama_model_n_embd_inp(model))

    def _free(self, handle: int) -> None:
        mtmd.mtmd_free(handle)

    # ------------------------------------------------------------------ prompts

    def _bitmap(self, data: bytes, index: int) -> int:
        if not data:
            raise InvalidImageError(f"image {index} is empty")
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        # The full struct: the bindings' convenience function drops `video_ctx`, which
        # would leak a video decoder (and its ffmpeg process) for a video file.
        wrapper = mtmd.mtmd_helper_bitmap_init_from_buf_wrapper(
            self.handle, buffer, len(data), False, mtmd.mtmd_helper_init_opt_default()
        )
        if wrapper.video_ctx:
            if wrapper.bitmap:
                mtmd.mtmd_bitmap_free(wrapper.bitmap)
            mtmd.mtmd_helper_video_free(wrapper.video_ctx)
            raise InvalidImageError(f"image {index} is a video; only images are supported")
        if not wrapper.bitmap:
            raise InvalidImageError(
                f"image {index} could not be decoded ({len(data)} bytes; "
                "JPEG, PNG, GIF, BMP and the other formats stb_image reads are supported)"
            )
        if mtmd.mtmd_bitmap_is_audio(wrapper.bitmap):
            mtmd.mtmd_bitmap_free(wrapper.bitmap)
            raise InvalidImageError(f"image {index} is audio; only images are supported")
        return int(wrapper.bitmap)

    def tokenize(self, prompt: str, images: Sequence[bytes]) -> MultimodalPrompt:
        """Chunks for `prompt` (a rendered chat prompt, with `self.marker` once per image,
        in order) and the images' file bytes.

        Special tokens are added and parsed as llama-server does for a multimodal
        prompt (`add_special` and `parse_special` true): a BOS where the vocabulary
        asks for one, `<|im_start|>` and the like as single tokens.
        """
        markers = prompt.count(self.marker)
        if markers != len(images):
            raise InvalidImageError(
                f"the prompt has {markers} image markers for {len(images)} images"
            )
        bitmaps: list[int] = []
        chunks = mtmd.mtmd_input_chunks_init()
        if not chunks:
            raise MemoryError("mtmd_input_chunks_init failed")
        try:
            for index, data in enumerate(images):
                bitmaps.append(self._bitmap(data, index))
            text = prompt.encode("utf-8")
            # The struct holds a pointer into `text`, which lives until the call returns.
            request = mtmd.mtmd_input_text(text, len(text), True, True)
            array = (mtmd.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
            status = mtmd.mtmd_tokenize(
                self.handle, chunks, ctypes.byref(request), array, len(bitmaps)
            )
        except BaseException:
            mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            # The chunks hold their own preprocessed copy of each image.
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        if status != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            reason = {1: "the image markers do not match the images", 2: "image preprocessing"}
            raise InvalidImageError(f"mtmd_tokenize failed: {reason.get(status, status)}")
        return MultimodalPrompt(int(chunks))

    # ------------------------------------------------------------------ evaluation

    def _check_context(self, ctx: Any, chunks: Sequence[Chunk], seq_id: int, n_batch: int) -> int:
        n_seq_max = int(llama_cpp.llama_n_seq_max(ctx))
        if not 0 <= seq_id < n_seq_max:
            raise ValueError(f"seq_id {seq_id} is outside the context's {n_seq_max} sequences")
        if n_batch <= 0:
            raise ValueError("n_batch must be positive")
        # libmtmd's batches are as large as the context's n_batch: larger aborts.
        n_batch = min(n_batch, int(llama_cpp.llama_n_batch(ctx)))
        if self.non_causal:
            # Non-causal attention cannot span two micro-batches: llama_decode asserts
            # n_ubatch >= n_tokens (process abort), and a split image would be wrong.
            n_ubatch = int(llama_cpp.llama_n_ubatch(ctx))
            largest = max((c.n_tokens for c in chunks if isinstance(c, ImageChunk)), default=0)
            if largest > n_ubatch:
                raise ValueError(
                    f"an image of {largest} tokens needs a micro-batch (n_ubatch) at least "
                    f"that large with this projector; the context has {n_ubatch}"
                )
            n_batch = min(n_batch, n_ubatch)
        return n_batch

    def eval(
        self,
        ctx: Any,
        prompt: MultimodalPrompt,
        *,
        n_past: int,
        seq_id: int,
        n_batch: int,
        logits_last: bool = True,
        start: int = 0,
    ) -> int:
        """Decode `prompt.chunks[start:]` into sequence `seq_id` from position `n_past`;
        returns the new n_past.

        Text runs go in batches of `n_batch` tokens; an image is encoded by the
        projector, then its embeddings are decoded in batches of `n_batch`. Each batch
        is its own `llama_decode` holding only this sequence, so it runs between two
        steps of the batching loop, never inside one. With `logits_last`, the last
        token's logits are at `llama_get_logits_ith(ctx, -1)` afterwards.
        """
        chunks = prompt.chunks[start:]
        if logits_last and chunks and isinstance(chunks[-1], ImageChunk):
            # libmtmd marks no image embedding as an output: there would be no logits
            # to sample from, and llama_get_logits_ith would return NULL.
            raise ValueError("a prompt to sample from must end with text, not an image")
        n_batch = self._check_context(ctx, chunks, seq_id, n_batch)
        position = n_past
        for offset in range(len(chunks)):
            last = logits_last and offset == len(chunks) - 1
            position = self._eval_checked(
                ctx, prompt, start + offset, position, seq_id, n_batch, last
            )
        return position

    def eval_chunk(
        self,
        ctx: Any,
        prompt: MultimodalPrompt,
        index: int,
        *,
        n_past: int,
        seq_id: int,
        n_batch: int,
    ) -> int:
        """Decode the one chunk `prompt.chunks[index]` (no logits); returns the new n_past.

        What the batching loop calls for an image between two steps: the slot's text
        chunks go into the shared batch with the other slots' tokens as usual (a batch
        cannot mix token ids and embeddings, so an image never can).
        """
        chunk = prompt.chunks[index]
        n_batch = self._check_context(ctx, [chunk], seq_id, n_batch)
        return self._eval_checked(ctx, prompt, index, n_past, seq_id, n_batch, False)

    def _eval_checked(
        self,
        ctx: Any,
        prompt: MultimodalPrompt,
        index: int,
        n_past: int,
        seq_id: int,
        n_batch: int,
        logits_last: bool,
    ) -> int:
        handle = mtmd.mtmd_input_chunks_get(prompt.handle, index)
        # The helper adds the text tokens it decodes to *new_n_past (it does not set it),
        # so it starts at n_past.
        new_n_past = llama_cpp.llama_pos(n_past)
        with self._lock:
            status = mtmd.mtmd_helper_eval_chunk_single(
                self.handle, ctx, handle, n_past, seq_id, n_batch, logits_last,
                ctypes.byref(new_n_past),
            )  # fmt: skip
        if status != 0:
            kind = "image" if isinstance(prompt.chunks[index], ImageChunk) else "text"
            reason = "no room left in the KV cache" if status == 1 else f"status {status}"
            raise RuntimeError(f"evaluating the prompt's {kind} chunk {index} failed: {reason}")
        return int(new_n_past.value)

    def encode(self, chunk: ImageChunk) -> np.ndarray:
        """The image's embeddings, (n_tokens, n_embd) float32, for a caller that decodes
        them itself (as llama-server does through `mtmd_helper_decode_image_chunk`)."""
        if chunk.owner.closed:
            raise RuntimeError("the image's prompt was closed")
        with self._lock:
            status = mtmd.mtmd_encode_chunk(self.handle, chunk.handle)
            if status != 0:
                raise RuntimeError(f"the projector failed to encode the image (status {status})")
            # libmtmd's buffer, overwritten by the next encode: copied under the lock.
            pointer = mtmd.mtmd_get_output_embd(self.handle)
            flat = np.ctypeslib.as_array(pointer, shape=(chunk.n_tokens * self.n_embd,))
            return flat.reshape(chunk.n_tokens, self.n_embd).copy()


def image_id(data: bytes) -> str:
    """The id libmtmd gives an image (the SHA-256 hex of its file bytes)."""
    return hashlib.sha256(data).hexdigest()
