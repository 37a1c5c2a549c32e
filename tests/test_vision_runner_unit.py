"""dmr_llamacpp.runner.vision against the oracle, native `llama-server --mmproj`.

SmolLM2 plus the random-weight test projector: for the same image and the same
rendered prompt (taken from the server's /apply-template), libmtmd through the
Python bindings must give the same prompt token count and the same greedy answer
as the server, through `llama_cpp.Llama` and through the runner's own multi-sequence
context (a KV stream per slot, `kv_unified` off), whatever the sequence, the batch
size, and with another slot's decoding interleaved.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import numpy as np
import pytest
from dmr_llamacpp.runner.extra_buffers import extra_buffers_usable
from dmr_llamacpp.runner.model import Batch, ContextOptions, LoadedModel
from dmr_llamacpp.runner.vision import (
    ImageChunk,
    InvalidImageError,
    MultimodalPrompt,
    TextChunk,
    VisionProjector,
    default_marker,
    image_id,
    set_mtmd_log_callback,
)

from tests.fixtures.llama_server import build_llama_server, running_llama_server
from tests.fixtures.server import free_port
from tests.fixtures.vision_projector import (
    png_data_url,
    sample_png,
    solid_png,
    write_test_projector,
)

pytestmark = [pytest.mark.llama, pytest.mark.slow]

IMAGE_TOKENS = 64  # (64 px / 8 px)**2, write_test_projector's defaults
MAX_TOKENS = 24
QUESTION = "Describe this image."


@dataclass(frozen=True)
class Reference:
    prompt: str  # rendered by the server's chat template, with our media marker
    prompt_tokens: int
    content: str
    completion_tokens: int


@pytest.fixture(scope="module")
def oracle_url(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path, projector_path: Path
) -> Iterator[str]:
    with running_llama_server(
        build_llama_server(),
        smollm2_gguf,
        free_port(),
        mmproj=projector_path,
        extra_args=["--parallel", "2", "--ctx-size", "8192", "--threads", "2"],
        log=tmp_path_factory.mktemp("vision-oracle") / "llama-server.log",
    ) as url:
        yield url


def _messages(images: list[bytes]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": png_data_url(image)}} for image in images
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]


def ask_oracle(url: str, images: list[bytes], marker: str) -> Reference:
    messages = _messages(images)
    rendered = httpx.post(f"{url}/apply-template", json={"messages": messages}, timeout=60)
    assert rendered.status_code == 200, rendered.text
    # The server's marker is random per process (`<__media_XXXX__>`), shown by /props.
    server_marker = httpx.get(f"{url}/props", timeout=10).json()["media_marker"]
    prompt = rendered.json()["prompt"]
    assert prompt.count(server_marker) == len(images), prompt
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return Reference(
        prompt=prompt.replace(server_marker, marker),
        prompt_tokens=body["usage"]["prompt_tokens"],
        content=body["choices"][0]["message"]["content"],
        completion_tokens=body["usage"]["completion_tokens"],
    )


class Greedy:
    """Greedy decoding on a raw context, a token per sequence per `llama_decode`."""

    def __init__(self, model: Any, ctx: Any) -> None:
        self.ctx = ctx
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.batch = Batch(8)

    def argmax(self, index: int) -> int:
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return int(np.argmax(np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))))

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def text(self, tokens: list[int]) -> str:
        buffer = ctypes.create_string_buffer(256)
        pieces = []
        for token in tokens:
            size = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 256, 0, False)
            pieces.append(buffer.raw[:size])
        return b"".join(pieces).decode("utf-8", errors="replace")

    def run(
        self, streams: dict[int, tuple[int, int]], limit: int = MAX_TOKENS
    ) -> dict[int, list[int]]:
        """`streams`: seq_id -> (n_past, first token, sampled from the prefill); every
        live sequence gets its next token in the same batch, as the runner's steps do."""
        out = {seq: [first] for seq, (_, first) in streams.items()}
        n_past = {seq: past for seq, (past, _) in streams.items()}
        while True:
            live = [s for s in out if len(out[s]) < limit and not self.is_eog(out[s][-1])]
            if not live:
                return {s: [t for t in tokens if not self.is_eog(t)] for s, tokens in out.items()}
            self.batch.clear()
            index = {}
            for seq in live:
                index[seq] = self.batch.add(out[seq][-1], n_past[seq], seq, wants_logits=True)
                n_past[seq] += 1
            self.batch.raw.n_tokens = self.batch.n_tokens
            assert llama_cpp.llama_decode(self.ctx, self.batch.raw) == 0
            for seq in live:
                out[seq].append(self.argmax(index[seq]))


@pytest.fixture(scope="module")
def runner_model(smollm2_gguf: Path) -> Iterator[LoadedModel]:
    """The runner's context: 4 slots, a KV stream each (as batching.py runs it)."""
    model = LoadedModel(
        smollm2_gguf,
        ContextOptions(
            n_ctx=4 * 2048,
            n_batch=512,
            n_ubatch=512,
            n_seq_max=4,
            threads=2,
            threads_batch=2,
            kv_unified=False,
        ),
    )
    yield model
    model.close()


@pytest.fixture(scope="module")
def projector(runner_model: LoadedModel, projector_path: Path) -> Iterator[VisionProjector]:
    set_mtmd_log_callback()
    with VisionProjector(projector_path, runner_model.model, n_threads=2) as loaded:
        yield loaded


def test_chunks_describe_the_prompt(projector: VisionProjector, runner_model: LoadedModel) -> None:
    image = sample_png()
    prompt = f"<|im_start|>user\n{projector.marker}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    with projector.tokenize(prompt, [image]) as tokenized:
        before, picture, after = tokenized.chunks
        assert isinstance(before, TextChunk) and isinstance(after, TextChunk)
        assert isinstance(picture, ImageChunk)
        assert (picture.n_tokens, picture.n_pos) == (IMAGE_TOKENS, IMAGE_TOKENS)
        assert picture.image_id == image_id(image)
        # SmolLM2 adds no BOS; the text runs are the runner's own tokenization.
        assert before.tokens == runner_model.tokenize("<|im_start|>user\n", add_special=True)
        assert after.tokens == runner_model.tokenize(
            f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special=False
        )
        assert tokenized.n_tokens == tokenized.n_pos == before.n_tokens + 64 + after.n_tokens
        assert projector.encode(picture).shape == (IMAGE_TOKENS, runner_model.n_embd)


def test_llama_high_level_matches_oracle(
    oracle_url: str, smollm2_gguf: Path, projector_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`llama_cpp.Llama` + the projector, prompt from the server's template."""
    set_mtmd_log_callback()
    # With the AMX/repacked weight buffers exactly where the runner loads models with
    # them: a build that crashes with them does so once a batch holds more than one
    # token (runner/extra_buffers.py), and `Llama` has no option for them.
    defaults = llama_cpp.llama_cpp.llama_model_default_params
    extra_buffers = extra_buffers_usable(smollm2_gguf)

    def as_the_runner() -> Any:
        params = defaults()
        params.use_extra_bufts = extra_buffers
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", as_the_runner)
    # Flash attention as llama-server's "auto" picks on CPU; Llama's default (off)
    # moves the logits by ~0.7 and the greedy answer with them.
    llm = llama_cpp.Llama(
        str(smollm2_gguf), n_ctx=2048, n_batch=512, n_threads=2, flash_attn=True, verbose=False
    )
    try:
        with VisionProjector(projector_path, llm.model, n_threads=2) as loaded:
            reference = ask_oracle(oracle_url, [sample_png()], loaded.marker)
            with loaded.tokenize(reference.prompt, [sample_png()]) as tokenized:
                assert tokenized.n_tokens == reference.prompt_tokens
                greedy = Greedy(llm.model, llm.ctx)
                n_past = loaded.eval(llm.ctx, tokenized, n_past=0, seq_id=0, n_batch=512)
                assert n_past == reference.prompt_tokens
                tokens = greedy.run({0: (n_past, greedy.argmax(-1))})[0]
        assert greedy.text(tokens) == reference.content
        assert len(tokens) == reference.completion_tokens
    finally:
        llm.close()


def _prefill(
    projector: VisionProjector, model: LoadedModel, prompt: MultimodalPrompt, seq: int, n_batch: int
) -> tuple[int, int]:
    model.forget_sequence(seq)
    n_past = projector.eval(model.ctx, prompt, n_past=0, seq_id=seq, n_batch=n_batch)
    return n_past, Greedy(model.model, model.ctx).argmax(-1)


def test_runner_context_matches_oracle(
    oracle_url: str, projector: VisionProjector, runner_model: LoadedModel
) -> None:
    """A slot other than the first, in the runner's 4-stream context."""
    reference = ask_oracle(oracle_url, [sample_png()], projector.marker)
    greedy = Greedy(runner_model.model, runner_model.ctx)
    with projector.tokenize(reference.prompt, [sample_png()]) as tokenized:
        assert tokenized.n_tokens == reference.prompt_tokens
        start = _prefill(projector, runner_model, tokenized, 2, 512)
        tokens = greedy.run({2: start})[2]
    assert greedy.text(tokens) == reference.content
    assert len(tokens) == reference.completion_tokens
    runner_model.forget_sequence(2)


def test_image_split_over_several_decodes(
    projector: VisionProjector, runner_model: LoadedModel
) -> None:
    """n_batch 16 decodes the 64 embeddings in four calls. Not bit-identical to one
    call: llama.cpp's logits move by ~0.6 with the batch split, for text prompts just
    the same, so token-for-token equality with llama-server needs its split (the
    context's n_batch). A misplaced or missing piece would move them far more."""
    prompt = f"<|im_start|>user\n{projector.marker}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    with projector.tokenize(prompt, [sample_png()]) as tokenized:
        logits = {}
        for seq, n_batch in ((0, 512), (3, 16)):
            runner_model.forget_sequence(seq)
            n_past = projector.eval(
                runner_model.ctx, tokenized, n_past=0, seq_id=seq, n_batch=n_batch
            )
            assert n_past == tokenized.n_tokens
            logits[n_batch] = runner_model.logits(-1)
            runner_model.forget_sequence(seq)
    assert np.argmax(logits[16]) == np.argmax(logits[512])
    assert np.abs(logits[16] - logits[512]).max() < 1.5


def test_two_images_match_oracle(
    oracle_url: str, projector: VisionProjector, runner_model: LoadedModel
) -> None:
    """Two images in one message: llama-server encodes them in one libmtmd batch,
    the wrapper one chunk at a time."""
    images = [sample_png(seed=1), solid_png((20, 120, 220))]
    reference = ask_oracle(oracle_url, images, projector.marker)
    greedy = Greedy(runner_model.model, runner_model.ctx)
    with projector.tokenize(reference.prompt, images) as tokenized:
        assert [type(chunk) for chunk in tokenized.chunks] == [
            TextChunk,
            ImageChunk,
            ImageChunk,
            TextChunk,
        ]
        assert tokenized.n_tokens == reference.prompt_tokens
        tokens = greedy.run({1: _prefill(projector, runner_model, tokenized, 1, 512)})[1]
    assert greedy.text(tokens) == reference.content
    runner_model.forget_sequence(1)


def test_image_prefill_between_other_slots_steps(
    oracle_url: str, projector: VisionProjector, runner_model: LoadedModel
) -> None:
    """Continuous batching with an image, as phase 2 runs it: slot 1 is generating
    when slot 0's image prompt arrives. Slot 0's text chunks share the steps' batches
    with slot 1's tokens; its image is decoded alone between two steps. Each answer is
    the one it gets alone (slot 0's is llama-server's)."""
    greedy = Greedy(runner_model.model, runner_model.ctx)
    red = solid_png((200, 30, 30))
    reference = ask_oracle(oracle_url, [red], projector.marker)
    text_prompt = runner_model.tokenize(
        "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
        add_special=True,
    )
    batch = Batch(128)

    def prefill_text(seq: int) -> tuple[int, int]:
        runner_model.forget_sequence(seq)
        batch.clear()
        for position, token in enumerate(text_prompt):
            batch.add(token, position, seq, wants_logits=position == len(text_prompt) - 1)
        assert batch.decode(runner_model) == 0
        return len(text_prompt), greedy.argmax(len(text_prompt) - 1)

    try:
        solo = greedy.run({1: prefill_text(1)})[1]

        n_past_1, first = prefill_text(1)
        generated = [first]
        runner_model.forget_sequence(0)
        with projector.tokenize(reference.prompt, [red]) as tokenized:
            before, picture, after = tokenized.chunks
            assert isinstance(before, TextChunk) and isinstance(after, TextChunk)
            # Step 1: slot 1's next token and slot 0's text up to the image.
            batch.clear()
            output_1 = batch.add(generated[-1], n_past_1, 1, wants_logits=True)
            for position, token in enumerate(before.tokens):
                batch.add(token, position, 0, wants_logits=False)
            assert batch.decode(runner_model) == 0
            generated.append(greedy.argmax(output_1))
            n_past_1 += 1
            # Between the steps: slot 0's image, alone in its decodes.
            n_past_0 = projector.eval_chunk(
                runner_model.ctx, tokenized, 1, n_past=before.n_tokens, seq_id=0, n_batch=512
            )
            assert n_past_0 == before.n_tokens + picture.n_tokens
            # Step 2: slot 1's next token and the rest of slot 0's prompt.
            batch.clear()
            output_1 = batch.add(generated[-1], n_past_1, 1, wants_logits=True)
            for offset, token in enumerate(after.tokens):
                last = offset == after.n_tokens - 1
                output_0 = batch.add(token, n_past_0 + offset, 0, wants_logits=last)
            assert batch.decode(runner_model) == 0
            generated.append(greedy.argmax(output_1))
            n_past_1 += 1
            first_0 = greedy.argmax(output_0)
            n_past_0 += after.n_tokens
        assert n_past_0 == reference.prompt_tokens
        # Then both generate in every step.
        together = greedy.run({0: (n_past_0, first_0), 1: (n_past_1, generated[-1])})
    finally:
        batch.free()
    assert greedy.text(together[0]) == reference.content
    assert generated[:-1] + together[1] == solo


def test_bad_input_raises_instead_of_aborting(
    projector: VisionProjector, runner_model: LoadedModel
) -> None:
    prompt = f"<|im_start|>user\n{projector.marker}Hi<|im_end|>\n<|im_start|>assistant\n"
    for corrupt in (b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b""):
        with pytest.raises(InvalidImageError):
            projector.tokenize(prompt, [corrupt])
    with pytest.raises(InvalidImageError, match="markers"):
        projector.tokenize(prompt, [sample_png(), sample_png()])
    with (
        projector.tokenize(f"Look: {projector.marker}", [sample_png()]) as tokenized,
        pytest.raises(ValueError, match="end with text"),
    ):
        projector.eval(runner_model.ctx, tokenized, n_past=0, seq_id=0, n_batch=512)
    with projector.tokenize(prompt, [sample_png()]) as tokenized:
        # libmtmd would GGML_ASSERT (abort the process) on either.
        with pytest.raises(ValueError, match="seq_id"):
            projector.eval(runner_model.ctx, tokenized, n_past=0, seq_id=4, n_batch=512)
        # A batch larger than the context's is cut to the context's n_batch.
        runner_model.forget_sequence(0)
        n_past = projector.eval(runner_model.ctx, tokenized, n_past=0, seq_id=0, n_batch=4096)
        assert n_past == tokenized.n_tokens
    runner_model.forget_sequence(0)


def test_non_causal_image_must_fit_one_micro_batch(
    tmp_path: Path, smollm2_gguf: Path, runner_model: LoadedModel
) -> None:
    """A gemma3 projector decodes its 16 embeddings with non-causal attention: with
    n_ubatch 8 llama_decode would abort the process (GGML_ASSERT); the wrapper raises."""
    path = write_test_projector(
        tmp_path / "gemma3.gguf", smollm2_gguf, projector_type="gemma3", layers=1
    )
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 1024, 64, 8, 2
    params.n_threads = params.n_threads_batch = 2
    small = llama_cpp.llama_init_from_model(runner_model.model, params)
    assert small
    prompt = f"<|im_start|>user\n{default_marker()}Hi<|im_end|>\n<|im_start|>assistant\n"
    try:
        with VisionProjector(path, runner_model.model, n_threads=2) as gemma3:
            assert gemma3.non_causal
            with gemma3.tokenize(prompt, [sample_png()]) as tokenized:
                assert [c.n_tokens for c in tokenized.images] == [16]
                with pytest.raises(ValueError, match="n_ubatch"):
                    gemma3.eval(small, tokenized, n_past=0, seq_id=1, n_batch=64)
                # A micro-batch of 512 takes it whole.
                runner_model.forget_sequence(1)
                n_past = gemma3.eval(runner_model.ctx, tokenized, n_past=0, seq_id=1, n_batch=512)
                assert n_past == tokenized.n_tokens
                runner_model.forget_sequence(1)
    finally:
        llama_cpp.llama_free(small)
