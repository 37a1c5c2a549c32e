"""Fixtures for the llama.cpp plugin tests: one real runner subprocess per mode and session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from dmr.records import Mode
from dmr.testing import sample_gguf
from llamacpp_helpers import RunnerProcess, make_bundle, make_launch, short_socket


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2 GGUF, cached under ~/.cache/dmr."""
    return sample_gguf()


@pytest.fixture(scope="session")
def llama_bundle(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("llamacpp"), smollm2_gguf)


@pytest.fixture(scope="session")
def completion_runner(llama_bundle: Path) -> Iterator[RunnerProcess]:
    runner = RunnerProcess(make_launch(llama_bundle, short_socket("completion")))
    yield runner
    runner.stop()


@pytest.fixture(scope="session")
def embedding_runner(llama_bundle: Path) -> Iterator[RunnerProcess]:
    runner = RunnerProcess(make_launch(llama_bundle, short_socket("embedding"), Mode.EMBEDDING))
    yield runner
    runner.stop()


@pytest.fixture(scope="session")
def reranking_runner(llama_bundle: Path) -> Iterator[RunnerProcess]:
    runner = RunnerProcess(make_launch(llama_bundle, short_socket("rerank"), Mode.RERANKING))
    yield runner
    runner.stop()


@pytest.fixture(scope="session")
def speculative_runner(llama_bundle: Path) -> Iterator[RunnerProcess]:
    """SmolLM2 drafting for itself: every greedy draft should be accepted."""
    launch = make_launch(llama_bundle, short_socket("speculative"), parallel=4)
    launch = replace(
        launch,
        draft_bundle_dir=llama_bundle,
        config=replace(launch.config, speculative_num_tokens=4),
    )
    runner = RunnerProcess(launch)
    yield runner
    runner.stop()


@pytest.fixture(scope="session")
def burst_runner(llama_bundle: Path) -> Iterator[RunnerProcess]:
    """A runner that waits 50 ms for the rest of a burst: long enough on a loaded machine."""
    launch = make_launch(
        llama_bundle, short_socket("burst"), parallel=4, runtime_flags=("--burst-gap-ms", "50")
    )
    runner = RunnerProcess(launch)
    yield runner
    runner.stop()
