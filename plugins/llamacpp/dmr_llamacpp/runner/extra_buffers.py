"""Whether llama.cpp's extra weight buffers (AMX, repacked) are safe with this build.

llama.cpp can keep weights in layouts made for the CPU's matrix instructions: on an
Intel Xeon with AMX, its AMX buffers compute a batch in tile instructions, twice as
fast as the plain kernels for SmolLM2 at every batch size (docs/scheduler.md, "Extra
weight buffers"). llama-server uses them by default.

llama-cpp-python is compiled on the user's machine, and GCC 12 miscompiles the AMX
kernels: it drops the stores that fill the tile configuration
(`ggml_tile_config_init`), so the first batch of more than one token ends in SIGSEGV
at `ldtilecfg`. Nothing in the library says which build it is. So before a runner
first loads a model with them, a child process loads that model with them and decodes
a batch of several tokens: a crash says no, and the answer is kept, per build of the
library and CPU, under the cache folder. The runner itself never crashes for it.

`DMR_LLAMACPP_EXTRA_BUFTS=1` uses them without asking, `=0` never.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CHECK_TIMEOUT_S",
    "Outcome",
    "build_key",
    "check_in_child",
    "extra_buffers_usable",
    "verdict",
]

# A child that loads a large model and repacks it may take a while; one that takes
# longer than this says nothing, and the runner goes on without the buffers.
CHECK_TIMEOUT_S = 600.0
# The child's exit code when the model put no weight in an extra buffer: it showed
# nothing about the build (the next model may), so nothing is kept.
EXIT_NOTHING_SHOWN = 3
# Names in llama.cpp's "load_tensors: <NAME> model buffer size" lines that are extra
# buffer types (ggml-cpu's amx.cpp and repack.cpp).
EXTRA_BUFFER_NAMES = ("AMX", "CPU_REPACK")

Outcome = bool | None  # usable, unusable, or nothing shown
ChildCheck = Callable[[Path], Outcome]


def _cache_folder(env: Mapping[str, str]) -> Path:
    root = env.get("DMR_CACHE_DIR") or str(Path.home() / ".cache" / "dmr")
    return Path(root) / "llamacpp-extra-buffers"


def _cpu_flags() -> str:
    """The CPU's feature flags: the same library runs other kernels on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def build_key() -> str:
    """The installed llama.cpp libraries (path, size, mtime) and the CPU's flags."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    parts = [llama_cpp.__version__, _cpu_flags()]
    for path in sorted(lib.glob("*")) if lib.is_dir() else []:
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def check_in_child(model_path: Path, timeout_s: float = CHECK_TIMEOUT_S) -> Outcome:
    """Load `model_path` with the extra buffers in a child process and decode a batch
    of several tokens: exit 0 says usable, a signal says not."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dmr_llamacpp.runner.extra_buffers", str(model_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    outcome = verdict(done.returncode)
    if outcome is None and done.returncode != EXIT_NOTHING_SHOWN:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        sys.stderr.write(f"extra weight buffers: the check failed ({done.returncode}): {tail}\n")
    return outcome


def verdict(returncode: int) -> Outcome:
    """What the child's exit says: 0 usable; killed by a signal (SIGSEGV at `ldtilecfg`,
    SIGILL, SIGBUS) unusable; anything else (it had no weight in an extra buffer, or
    failed before computing) nothing."""
    if returncode == 0:
        return True
    if returncode < 0:
        return False
    return None


def extra_buffers_usable(
    model_path: Path,
    env: Mapping[str, str] = os.environ,
    *,
    check: ChildCheck = check_in_child,
    key: Callable[[], str] = build_key,
    offloading: bool = False,
) -> bool:
    """Whether to load `model_path` with llama.cpp's extra weight buffers.

    `offloading`: the runner puts layers on a GPU. The check loads the whole model on
    the CPU, which a model sized for the GPU may not fit, and the buffers only serve
    the layers left on the CPU; so only a build already checked uses them there."""
    setting = env.get("DMR_LLAMACPP_EXTRA_BUFTS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    record = _cache_folder(env) / f"{key()}.json"
    try:
        return bool(json.loads(record.read_text())["usable"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not checked yet, or a damaged record: check again
    if offloading:
        return False
    outcome = check(model_path)
    if outcome is None:
        # Nothing shown (no weight of this model goes to an extra buffer, or the check
        # timed out): this load goes without them, and the next model is checked.
        return False
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({"usable": outcome, "model": str(model_path)}))
    partial.replace(record)
    if not outcome:
        sys.stderr.write(
            "llama.cpp's extra weight buffers (AMX, repacked) crash with this build of "
            "llama-cpp-python, so the runner computes without them. GCC 12 miscompiles "
            "the AMX kernels; rebuilding with CMAKE_ARGS='-DCMAKE_C_FLAGS=-fno-dse "
            "-DCMAKE_CXX_FLAGS=-fno-dse' pip install --force-reinstall --no-cache-dir "
            "--no-deps llama-cpp-python makes them usable (docs/scheduler.md).\n"
        )
    return outcome


def _child(model_path: Path) -> int:
    """Load the model with the extra buffers and decode 8 tokens in one batch (the
    AMX kernels configure their tiles for a batch of more than one token)."""
    import llama_cpp

    from dmr_llamacpp.runner.model import Batch, ContextOptions, LoadedModel

    buffers: list[str] = []

    def collect(_level: int, text: bytes, _user_data: Any) -> None:
        line = text.decode("utf-8", errors="replace")
        if "model buffer size" in line:
            buffers.append(line)

    callback = llama_cpp.llama_log_callback(collect)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    options = ContextOptions(
        n_ctx=256, n_batch=64, n_ubatch=64, n_seq_max=1, threads=2, threads_batch=2
    )
    model = LoadedModel(model_path, options, extra_buffers=True)
    if not any(name in line for line in buffers for name in EXTRA_BUFFER_NAMES):
        return EXIT_NOTHING_SHOWN
    batch = Batch(64)
    token = llama_cpp.llama_vocab_bos(model.vocab)
    token = token if 0 <= token < model.n_vocab else 0
    for position in range(8):
        batch.add(token, position, 0, wants_logits=position == 7)
    if batch.decode(model) != 0:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child(Path(sys.argv[1])))
