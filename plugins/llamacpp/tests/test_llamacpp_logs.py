"""llama.cpp's own log lines in the runner's output: errors and warnings, not chatter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LOAD = """
import sys
from dmr_llamacpp.runner.model import silence_llama_logs
silence_llama_logs()
import llama_cpp
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_default_params()
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), params)
print("loaded" if model else "refused")
"""


def test_a_model_that_fails_to_load_says_why_and_nothing_else(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_gguf.read_bytes()[:2_000_000])
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(truncated)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == "refused"
    # The error reaches the log the scheduler reports a failed start from...
    assert "error loading model" in result.stderr
    assert "not within the file bounds" in result.stderr
    # ...and llama.cpp's informational lines (the loader's metadata dump) do not.
    assert "llama_model_loader: loaded meta data" not in result.stderr
    assert "llama_model_loader: - kv" not in result.stderr
