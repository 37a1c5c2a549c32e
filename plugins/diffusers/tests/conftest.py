"""Fixtures for the diffusers plugin tests: the tiny pipeline and one real runner."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from diffusers_helpers import RunnerProcess, make_bundle, make_launch, short_socket
from dmr_diffusers.testing import build_tiny_pipeline, pack_dduf


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random pipeline as a diffusers directory."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def tiny_diffusers_dduf(tiny_diffusers_dir: Path) -> Path:
    """The same pipeline as one DDUF archive."""
    return pack_dduf(tiny_diffusers_dir, tiny_diffusers_dir.parent / "tiny-sd.dduf")


@pytest.fixture(scope="session")
def dir_bundle(tiny_diffusers_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("diffusers-bundles"), tiny_diffusers_dir)


@pytest.fixture(scope="session")
def dduf_bundle(tiny_diffusers_dduf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("diffusers-bundles"), tiny_diffusers_dduf)


@pytest.fixture(scope="session")
def image_runner(dir_bundle: Path) -> Iterator[RunnerProcess]:
    runner = RunnerProcess(make_launch(dir_bundle, short_socket()))
    yield runner
    runner.stop()
