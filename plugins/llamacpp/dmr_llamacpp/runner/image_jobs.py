"""A rendered chat prompt with images made into a generation job.

libmtmd tokenizes the prompt (its text, and one chunk per image, as `llama-server
--mmproj` does); the job's token list is those text tokens with each image's KV
cells as placeholder ids (`image_placeholders`), which the batching loop decodes
through the projector (runner/batching.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from dmr.sdk.runner import BadRequest

from dmr_llamacpp.runner.batching import GenerationJob, image_placeholders
from dmr_llamacpp.runner.priority import batch_request, lone_request
from dmr_llamacpp.runner.reasoning import ThinkingBudget
from dmr_llamacpp.runner.sampling import SamplingParams
from dmr_llamacpp.runner.state import RunnerState

__all__ = ["start_image_job"]


async def start_image_job(
    state: RunnerState,
    prompt: str,
    images: Sequence[bytes],
    params: SamplingParams,
    thinking: ThinkingBudget | None = None,
) -> GenerationJob:
    """Tokenize `prompt` (one `state.media_marker` per image) with `images` and submit
    the job; a bad image or a prompt too long is a 400."""
    from dmr_llamacpp.runner.vision import ImageChunk, InvalidImageError

    projector = state.require_projector()
    model = state.require_model()
    generator = state.require_generator()
    try:
        # Decoding and resizing the images takes a while: not on the event loop.
        media = await asyncio.to_thread(projector.tokenize, prompt, list(images))
    except InvalidImageError as error:
        raise BadRequest(str(error), "messages") from None
    try:
        tokens: list[int] = []
        offsets: dict[int, int] = {}
        for index, chunk in enumerate(media.chunks):
            if isinstance(chunk, ImageChunk):
                offsets[len(tokens)] = index
                tokens.extend(image_placeholders(chunk.image_id, chunk.n_tokens))
            else:
                tokens.extend(chunk.tokens)
        if not media.chunks or isinstance(media.chunks[-1], ImageChunk):
            # No text token after the image: nothing to sample the answer from.
            raise BadRequest("the rendered prompt ends with an image", "messages")
        if projector.non_causal:
            largest = max(chunk.n_tokens for chunk in media.images)
            if largest > model.options.n_ubatch:
                raise BadRequest(
                    f"an image takes {largest} tokens with this projector, more than the "
                    f"runner's micro-batch of {model.options.n_ubatch} (--ubatch-size) holds"
                )
        job = GenerationJob(
            tokens,
            params,
            media=media,
            images=offsets,
            batch=batch_request.get(),
            lone=lone_request.get(),
        )
        job.thinking = thinking
        generator.submit(job)
    except BadRequest:
        media.close()
        raise
    except ValueError as error:
        media.close()
        raise BadRequest(str(error)) from None
    return job
