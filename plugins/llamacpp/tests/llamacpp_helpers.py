"""Helpers for the llama.cpp plugin tests (a uniquely named module: plugins share `conftest`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from dmr import testing
from dmr.records import AcceleratorInfo, Mode, RunnerLaunch
from dmr.testing import CPU, short_socket
from dmr_llamacpp.engine import LlamaCppEngine

if TYPE_CHECKING:
    from dmr_llamacpp.runner.batching import BatchedGenerator, Finished
    from dmr_llamacpp.runner.model import LoadedModel
    from dmr_llamacpp.runner.sampling import SamplingParams

__all__ = ["CPU", "RunnerProcess", "make_bundle", "make_launch", "short_socket"]


def make_bundle(root: Path, gguf: Path) -> Path:
    """A store-shaped bundle (`model/model.gguf`) that links to the cached weights."""
    bundle = root / "bundle"
    (bundle / "model").mkdir(parents=True, exist_ok=True)
    target = bundle / "model" / "model.gguf"
    if not target.exists():
        target.symlink_to(gguf)
    return bundle


def make_launch(
    bundle: Path,
    socket_path: Path,
    mode: Mode = Mode.COMPLETION,
    *,
    context_size: int | None = 512,
    parallel: int | None = 8,  # None: the engine sizes the slots
    runtime_flags: tuple[str, ...] = (),
    device: AcceleratorInfo = CPU,
) -> RunnerLaunch:
    return testing.make_launch(
        bundle,
        socket_path,
        mode=mode,
        model_name="ai/smollm2:latest",
        device=device,
        context_size=context_size,
        runtime_flags=runtime_flags,
        engine_options={} if parallel is None else {"llamacpp": {"parallel": parallel}},
    )


class RunnerProcess(testing.RunnerProcess):
    """The llama.cpp runner subprocess, started as the scheduler starts it."""

    def __init__(
        self, launch: RunnerLaunch, *, wait: bool = True, env: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(LlamaCppEngine(), launch, wait=wait, env=env)


def slot_streams_model(bundle: Path, slots: int, cells: int) -> LoadedModel:
    """The bundle's model loaded in this process as a runner loads it: a KV stream of
    `cells` cells for each of `slots` slots, two threads."""
    from dmr_llamacpp.runner.model import ContextOptions, LoadedModel

    options = ContextOptions(
        n_ctx=cells * slots,
        n_batch=512,
        n_ubatch=512,
        n_seq_max=slots,
        threads=2,
        threads_batch=2,
        kv_unified=False,
    )
    return LoadedModel(bundle / "model" / "model.gguf", options)


def greedy_params(max_tokens: int) -> SamplingParams:
    """Temperature 0 with every penalty off, going on past end-of-text: the same tokens
    every run, `max_tokens` of them, for tests that drive the decode loop in-process."""
    from dmr_llamacpp.runner.sampling import SamplingParams

    return SamplingParams(
        temperature=0.0,
        top_k=40,
        top_p=0.95,
        min_p=0.05,
        repeat_penalty=1.0,
        repeat_last_n=64,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        seed=1,
        max_tokens=max_tokens,
        ignore_eos=True,
    )


async def generated(
    generator: BatchedGenerator, text: str, params: SamplingParams
) -> tuple[str, Finished]:
    """`text`'s answer from an in-process decode loop: its text and its `Finished`
    event (a `Failed` one fails the test)."""
    from dmr_llamacpp.runner.batching import Failed, Finished, GenerationJob

    job = GenerationJob(generator.model.tokenize(text, add_special=True), params)
    generator.submit(job)
    parts: list[str] = []
    while True:
        event = await job.events.get()
        if isinstance(event, Failed):
            raise AssertionError(event)
        if isinstance(event, Finished):
            return "".join(parts), event
        parts.append(event.text)
