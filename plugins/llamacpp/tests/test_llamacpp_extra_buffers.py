"""Whether a runner loads weights into llama.cpp's extra buffers (runner/extra_buffers.py).

The checks here are fakes (a function the test answers for) where the decision and its
record are tested, and real child processes where their exit is read; the real check
on the real SmolLM2, through a real server, is tests/test_extra_buffers_smollm2.py's.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dmr_llamacpp.runner.extra_buffers import Outcome, build_key, extra_buffers_usable, verdict

MODEL = Path("/models/some.gguf")


class FakeCheck:
    """A fake child check: answers `outcome` and counts its calls."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.calls: list[Path] = []

    def __call__(self, model_path: Path) -> Outcome:
        self.calls.append(model_path)
        return self.outcome


def decide(tmp_path: Path, check: FakeCheck, key: str = "build-a", **env: str) -> bool:
    return extra_buffers_usable(
        MODEL, {"DMR_CACHE_DIR": str(tmp_path), **env}, check=check, key=lambda: key
    )


@pytest.mark.parametrize("setting", ["0", "false", "no", "off"])
def test_turned_off_never_checks(tmp_path: Path, setting: str) -> None:
    check = FakeCheck(True)
    assert decide(tmp_path, check, DMR_LLAMACPP_EXTRA_BUFTS=setting) is False
    assert check.calls == []


@pytest.mark.parametrize("setting", ["1", "true", "on"])
def test_turned_on_never_checks(tmp_path: Path, setting: str) -> None:
    check = FakeCheck(False)
    assert decide(tmp_path, check, DMR_LLAMACPP_EXTRA_BUFTS=setting) is True
    assert check.calls == []


@pytest.mark.parametrize("outcome", [True, False])
def test_a_build_is_checked_once_and_its_answer_kept(tmp_path: Path, outcome: bool) -> None:
    check = FakeCheck(outcome)
    assert decide(tmp_path, check) is outcome
    assert decide(tmp_path, check) is outcome
    assert check.calls == [MODEL]
    record = json.loads((tmp_path / "llamacpp-extra-buffers" / "build-a.json").read_text())
    assert record["usable"] is outcome


def test_a_runner_with_gpu_layers_uses_only_a_build_already_checked(tmp_path: Path) -> None:
    check = FakeCheck(True)
    env = {"DMR_CACHE_DIR": str(tmp_path)}
    usable = extra_buffers_usable(MODEL, env, check=check, key=lambda: "a", offloading=True)
    assert usable is False and check.calls == []
    assert decide(tmp_path, check, key="a") is True  # a CPU runner checks it
    assert extra_buffers_usable(MODEL, env, check=check, key=lambda: "a", offloading=True)
    assert check.calls == [MODEL]


def test_another_build_is_checked_again(tmp_path: Path) -> None:
    decide(tmp_path, FakeCheck(False), key="build-a")
    check = FakeCheck(True)
    assert decide(tmp_path, check, key="build-b") is True
    assert check.calls == [MODEL]


def test_a_check_that_showed_nothing_loads_without_them_and_is_not_kept(tmp_path: Path) -> None:
    check = FakeCheck(None)
    assert decide(tmp_path, check) is False
    assert decide(tmp_path, check) is False
    assert len(check.calls) == 2
    assert not (tmp_path / "llamacpp-extra-buffers").exists()


def test_a_damaged_record_is_checked_again(tmp_path: Path) -> None:
    folder = tmp_path / "llamacpp-extra-buffers"
    folder.mkdir()
    (folder / "build-a.json").write_text('{"usab')
    check = FakeCheck(True)
    assert decide(tmp_path, check) is True
    assert check.calls == [MODEL]


def test_an_unusable_build_is_reported_with_the_rebuild(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    decide(tmp_path, FakeCheck(False))
    assert "-fno-dse" in capsys.readouterr().err


def exit_of(code: str) -> int:
    return subprocess.run([sys.executable, "-c", code], check=False).returncode


def test_a_child_killed_by_a_signal_says_unusable() -> None:
    # A real process that dies as the AMX kernels of a GCC 12 build do (SIGSEGV).
    code = f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})"
    assert verdict(exit_of(code)) is False


def test_a_child_that_exits_says_usable_or_nothing() -> None:
    assert verdict(exit_of("pass")) is True
    assert verdict(exit_of("raise SystemExit(3)")) is None
    assert verdict(exit_of("raise RuntimeError('failed to load')")) is None


def test_the_build_key_follows_the_installed_libraries() -> None:
    assert build_key() == build_key()
    assert len(build_key()) == 32
