"""A batched kernel for Q4_1 weights, in front of llama.cpp's own (q4_1_gemm.c).

llama.cpp's CPU backend offers every matrix product to `llamafile_sgemm` first; its
tiled kernels take F32, F16, BF16, Q8_0, Q4_0, Q5_0 and IQ4_NL weights and decline
Q4_1, which then costs one dot product per weight row and token. On a CPU without
llama.cpp's AMX buffers, a batch of 16 SmolLM2 tokens (Q4_1) then costs almost 16
single-token steps, and more streams than llama-server's slots gain little
(docs/scheduler.md, "Batched Q4_1 products").

`q4_1_gemm.c` defines a `llamafile_sgemm` of its own: Q4_1 products go to its tiled
kernel, everything else to the library's function. Its outputs are bit-identical to
llama.cpp's `ggml_vec_dot_q4_1_q8_1` (the same operations in the same order), so
answers do not change; `activate` checks that on this machine, against the library's
own function, before turning the kernel on.

How it gets in front: libggml-cpu calls `llamafile_sgemm` through its PLT, and the
dynamic linker resolves that in the global scope first. So the runner loads this
library with RTLD_GLOBAL before anything imports llama_cpp (`load_before_llama_cpp`),
and then hands it the library's own functions (`activate`).

It is compiled on first use with the C compiler that llama-cpp-python's build needs
(`CC`, else `cc`), once per source and compiler, under the cache folder. Without a
compiler, on another CPU or OS, with `DMR_LLAMACPP_Q4_1_GEMM=0`, or where the check
fails, llama.cpp computes as before and the runner's log says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ENV_SWITCH",
    "Kernel",
    "activate",
    "block_arrays",
    "ggml_cpu_library",
    "load_before_llama_cpp",
    "matches_library",
    "products_computed",
]

log = logging.getLogger(__name__)

ENV_SWITCH = "DMR_LLAMACPP_Q4_1_GEMM"
SOURCE = Path(__file__).with_name("q4_1_gemm.c")
COMPILE_TIMEOUT_S = 120.0

# ggml's block layouts (ggml-common.h): 32 weights per block.
Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
Q8_1_BLOCK = np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)])
# (rows, tokens, blocks) of the check: full tiles, every edge shape, one token.
CHECK_SHAPES = ((37, 1, 3), (64, 5, 18), (16, 16, 48), (9, 33, 2), (8, 70, 4))

_VARIANTS = {1: "AVX2", 2: "AVX-512 VNNI"}


@dataclass
class Kernel:
    """The loaded library, and what became of it."""

    library: ctypes.CDLL | None
    status: str
    variant: int = 0


_active: Kernel | None = None


def _cache_folder(env: Mapping[str, str]) -> Path:
    root = env.get("DMR_CACHE_DIR") or str(Path.home() / ".cache" / "dmr")
    return Path(root) / "llamacpp-q4_1-gemm"


def _compiler(env: Mapping[str, str]) -> str | None:
    return shutil.which(env.get("CC") or "cc")


def _compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    return done.stdout


def compiled_library(env: Mapping[str, str] = os.environ) -> Path:
    """The kernel's shared library, compiled once per source and compiler (atomically
    renamed into the cache folder, so runners starting together do not clash)."""
    compiler = _compiler(env)
    if compiler is None:
        raise OSError("no C compiler (cc, or CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + _compiler_version(compiler).encode()).hexdigest()[:24]
    folder = _cache_folder(env)
    target = folder / f"q4_1_gemm-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = Path(scratch) / target.name
        done = subprocess.run(
            [compiler, "-O3", "-fPIC", "-shared", "-o", str(built), str(SOURCE), "-ldl"],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def load_before_llama_cpp(env: Mapping[str, str] = os.environ) -> Kernel:
    """Load the kernel's library into the global scope, before llama_cpp loads
    libggml-cpu. Never raises: a kernel that cannot load says why in its status."""
    if env.get(ENV_SWITCH, "1") == "0":
        return Kernel(None, f"off ({ENV_SWITCH}=0)")
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return Kernel(None, f"off (x86-64 Linux only, not {sys.platform} {platform.machine()})")
    if "llama_cpp" in sys.modules:
        return Kernel(None, "off (llama_cpp was loaded before the kernel)")
    try:
        library = ctypes.CDLL(str(compiled_library(env)), mode=ctypes.RTLD_GLOBAL)
    except (OSError, subprocess.SubprocessError) as error:
        return Kernel(None, f"off ({error})")
    library.dmr_q41_products.restype = ctypes.c_int64
    return Kernel(library, "loaded")


def ggml_cpu_library() -> ctypes.CDLL:
    """libggml-cpu as llama_cpp loaded it (the same handle: dlopen of a loaded file)."""
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-cpu.so", "libggml-cpu.so.0"):
        if (folder / name).exists():
            return ctypes.CDLL(str(folder / name))
    raise OSError(f"no libggml-cpu.so in {folder}")


def block_arrays(
    rows: int, tokens: int, blocks: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random Q4_1 weight rows and Q8_1 token rows, with scales from tiny to large."""
    weights = np.zeros((rows, blocks), Q4_1_BLOCK)
    weights["d"] = rng.uniform(-1, 1, weights.shape) * 10.0 ** rng.integers(-6, 2, weights.shape)
    weights["m"] = rng.uniform(-1, 1, weights.shape) * 10.0 ** rng.integers(-6, 2, weights.shape)
    weights["qs"] = rng.integers(0, 256, (rows, blocks, 16))
    tokens_ = np.zeros((tokens, blocks), Q8_1_BLOCK)
    quants = rng.integers(-127, 128, (tokens, blocks, 32))
    scale = rng.uniform(0, 1, tokens_.shape) * 10.0 ** rng.integers(-5, 1, tokens_.shape)
    tokens_["qs"] = quants
    tokens_["d"] = scale
    tokens_["s"] = scale * quants.sum(axis=2)
    return weights, tokens_


def _pointer(array: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(array.ctypes.data)


def matches_library(
    library: ctypes.CDLL,
    ggml_cpu: ctypes.CDLL,
    variant: int,
    shapes: Sequence[tuple[int, int, int]] = CHECK_SHAPES,
    seed: int = 41,
) -> bool:
    """Whether `variant` of the kernel gives, bit for bit, what llama.cpp's own
    `ggml_vec_dot_q4_1_q8_1` gives, on random products of these (rows, tokens, blocks)."""
    vec_dot = ggml_cpu.ggml_vec_dot_q4_1_q8_1
    vec_dot.restype = None
    rng = np.random.default_rng(seed)
    for rows, tokens, blocks in shapes:
        weights, activations = block_arrays(rows, tokens, blocks, rng)
        ours = np.zeros((tokens, rows), np.float32)
        library.dmr_q41_gemm(
            ctypes.c_int(variant),
            *(ctypes.c_int64(v) for v in (rows, tokens, blocks)),
            _pointer(weights),
            ctypes.c_int64(blocks),
            _pointer(activations),
            ctypes.c_int64(blocks),
            _pointer(ours),
            ctypes.c_int64(rows),
        )
        theirs = np.zeros((tokens, rows), np.float32)
        out = ctypes.c_float()
        for j in range(tokens):
            for i in range(rows):
                vec_dot(
                    ctypes.c_int(blocks * 32),
                    ctypes.byref(out),
                    ctypes.c_size_t(0),
                    ctypes.c_void_p(weights.ctypes.data + i * blocks * Q4_1_BLOCK.itemsize),
                    ctypes.c_size_t(0),
                    ctypes.c_void_p(activations.ctypes.data + j * blocks * Q8_1_BLOCK.itemsize),
                    ctypes.c_size_t(0),
                    ctypes.c_int(1),
                )
                theirs[j, i] = out.value
        if ours.tobytes() != theirs.tobytes():
            return False
    return True


def activate(kernel: Kernel) -> Kernel:
    """Hand a loaded kernel the library's own functions and turn it on where it matches
    llama.cpp bit for bit; the kernel, its status saying what became of it."""
    global _active
    if kernel.library is None:
        return kernel
    library = kernel.library
    try:
        ggml_cpu = ggml_cpu_library()
        ggml_cpu.ggml_cpu_init()  # fills the FP16 table vec_dot reads
        own = ctypes.cast(ggml_cpu.llamafile_sgemm, ctypes.c_void_p)
    except (OSError, AttributeError) as error:
        return Kernel(library, f"off ({error})")
    library.dmr_q41_set_library(own)
    variant = int(library.dmr_q41_best_variant())
    if variant == 0:
        return Kernel(library, "off (this CPU has no AVX2 and FMA)")
    if not matches_library(library, ggml_cpu, variant):
        return Kernel(library, f"off ({_VARIANTS[variant]} kernel differs from llama.cpp's here)")
    library.dmr_q41_enable(ctypes.c_int(variant))
    _active = Kernel(library, f"on ({_VARIANTS[variant]})", variant)
    return _active


def products_computed() -> int:
    """Matrix products the kernel computed in this process (0 when it is off)."""
    if _active is None or _active.library is None:
        return 0
    return int(_active.library.dmr_q41_products())
