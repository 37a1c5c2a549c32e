"""dmr's batched Q4_1 kernel in front of llama.cpp's (runner/q4_1_gemm.py).

The kernel must load before llama_cpp does, so the real checks run in fresh Python
processes: the kernel against llama.cpp's own `ggml_vec_dot_q4_1_q8_1`, bit for bit,
and the real SmolLM2 (Q4_1) through llama-cpp-python with the kernel on and off. The
guard that keeps a kernel which differs off is tested with a fake library. The real
server's use of it is tests/test_q4_1_gemm_smollm2.py's.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dmr_llamacpp.runner import q4_1_gemm
from dmr_llamacpp.runner.q4_1_gemm import (
    ENV_SWITCH,
    Kernel,
    activate,
    compiled_library,
    load_before_llama_cpp,
)

pytestmark = [pytest.mark.llama]


def fresh_python(code: str, **env: str) -> Any:
    """Run `code` in a new interpreter (nothing loaded yet); the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Every tile shape and edge: 1 to 4 rows and tokens over, one token, long rows.
SHAPES = [
    (1, 2, 1),
    (3, 7, 5),
    (4, 4, 18),
    (5, 9, 2),
    (16, 16, 48),
    (17, 65, 3),
    (33, 130, 2),
    (64, 2, 18),
    (7, 1, 6),
]

KERNEL_AGAINST_LIBRARY = f"""
import json
from dmr_llamacpp.runner import q4_1_gemm as q
kernel = q.activate(q.load_before_llama_cpp())
ggml_cpu = q.ggml_cpu_library()
best = int(kernel.library.dmr_q41_best_variant())
same = {{
    variant: q.matches_library(kernel.library, ggml_cpu, variant, {SHAPES!r}, seed=7)
    for variant in range(1, best + 1)
}}
print(json.dumps({{"status": kernel.status, "best": best, "same": same}}))
"""


def test_the_kernel_gives_llama_cpps_own_products_bit_for_bit(tmp_path: Path) -> None:
    result = fresh_python(KERNEL_AGAINST_LIBRARY, DMR_CACHE_DIR=str(tmp_path))
    # This suite's machines have AVX2 and FMA; the kernel is on and says which variant.
    assert result["best"] >= 1
    assert result["status"].startswith("on (")
    # Every variant this CPU runs (AVX2, and AVX-512 VNNI where it has it) matches.
    assert result["same"] == {str(v): True for v in range(1, result["best"] + 1)}
    # It was compiled once, into the cache folder given.
    assert len(list((tmp_path / "llamacpp-q4_1-gemm").glob("q4_1_gemm-*.so"))) == 1


SMOLLM2_LOGITS = """
import hashlib, json, sys
from dmr_llamacpp.runner import q4_1_gemm as q
kernel = q.load_before_llama_cpp()
import llama_cpp
if {activate!r}:
    kernel = q.activate(kernel)
llm = llama_cpp.Llama({path!r}, n_ctx=512,
    n_batch=64, n_threads=2, logits_all=True, verbose=False)
tokens = llm.tokenize(b"The lighthouse keeper climbed the stairs at dusk and lit the lamp.")
llm.eval(tokens)  # one batch of every prompt token
print(json.dumps({{
    "status": kernel.status,
    "tokens": len(tokens),
    "logits": hashlib.sha256(llm.scores[: len(tokens)].tobytes()).hexdigest(),
    "products": q.products_computed(),
}}))
"""


def test_smollm2_computes_the_same_logits_with_the_kernel_and_without(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    code = SMOLLM2_LOGITS.format(path=str(smollm2_gguf), activate=True)
    on = fresh_python(code, DMR_CACHE_DIR=str(tmp_path))
    off = fresh_python(code, DMR_CACHE_DIR=str(tmp_path), **{ENV_SWITCH: "0"})
    assert on["status"].startswith("on (") and off["status"] == f"off ({ENV_SWITCH}=0)"
    assert on["tokens"] > 8
    # The batch went through the kernel: 7 products of Q4_1 weights in each of 30 layers.
    assert on["products"] >= 7 * 30 and off["products"] == 0
    # Every logit of every prompt position, bit for bit.
    assert on["logits"] == off["logits"]


def test_loaded_but_never_turned_on_it_leaves_llama_cpps_kernels_to_llama_cpp(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    """A loader that could not finish: the kernel is in front of llama.cpp's, but off.
    SmolLM2's output matrix is Q8_0, which llama.cpp's tinyBLAS computes for a batch,
    with other sums than its row-by-row path: the logits match only if the kernel
    handed that product on to the library's own function."""
    loaded = fresh_python(
        SMOLLM2_LOGITS.format(path=str(smollm2_gguf), activate=False),
        DMR_CACHE_DIR=str(tmp_path),
    )
    off = fresh_python(
        SMOLLM2_LOGITS.format(path=str(smollm2_gguf), activate=True),
        DMR_CACHE_DIR=str(tmp_path),
        **{ENV_SWITCH: "0"},
    )
    assert loaded["status"] == "loaded" and loaded["products"] == 0
    assert loaded["logits"] == off["logits"]


class FakeLibrary:
    """A fake kernel library whose products are all zeros: not llama.cpp's."""

    def __init__(self) -> None:
        self.enabled: list[int] = []

    def dmr_q41_set_library(self, *functions: ctypes.c_void_p) -> None:
        assert all(function.value for function in functions)

    def dmr_q41_best_variant(self) -> int:
        return 1

    def dmr_q41_gemm(self, *args: object) -> None:
        pass  # leaves the output as it was: zeros

    def dmr_q41_enable(self, variant: ctypes.c_int) -> None:
        self.enabled.append(variant.value)


def test_a_kernel_that_differs_from_llama_cpp_stays_off() -> None:
    import llama_cpp

    llama_cpp.llama_backend_init()
    fake = FakeLibrary()
    kernel = activate(Kernel(fake, "loaded"))  # type: ignore[arg-type]
    assert kernel.status == "off (AVX2 kernel differs from llama.cpp's here)"
    assert fake.enabled == []
    assert q4_1_gemm.products_computed() == 0


def test_turned_off_or_too_late_it_is_not_loaded() -> None:
    off = load_before_llama_cpp({ENV_SWITCH: "0"})
    assert off.library is None and off.status == f"off ({ENV_SWITCH}=0)"
    import llama_cpp  # noqa: F401  (this test process has loaded the library)

    late = load_before_llama_cpp({})
    assert late.library is None
    assert late.status == "off (llama_cpp was loaded before the kernel)"


def test_without_a_compiler_it_says_so(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="no C compiler"):
        compiled_library({"CC": str(tmp_path / "no-such-cc"), "DMR_CACHE_DIR": str(tmp_path)})


def test_a_compiler_error_is_reported_and_nothing_is_kept(tmp_path: Path) -> None:
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'broken' >&2\nexit 1\n")
    failing.chmod(0o755)
    with pytest.raises(OSError, match="broken"):
        compiled_library({"CC": str(failing), "DMR_CACHE_DIR": str(tmp_path)})
    assert list((tmp_path / "llamacpp-q4_1-gemm").iterdir()) == []
