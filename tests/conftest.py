import os

# The CLI starts `dmr serve` itself when no server answers (dmr.cli.autostart). Every
# test that runs it with no server must get the error instead of leaving a server
# behind; the tests of auto-start remove this from the environment they give the CLI.
os.environ["DMR_NO_AUTOSTART"] = "1"
# Greedy answers compared across requests and runners assume one thread count, and a
# runner that yields the cores the other pytest worker keeps busy computes with fewer
# (docs/scheduler.md, "Busy neighbours"): llama.cpp's flash attention splits a KV view
# of 512 cells or more into one chunk per thread, so the logits then differ in their
# last bits. tests/test_free_cores_smollm2.py turns it back on for its servers.
os.environ.setdefault("DMR_FREE_CORES", "0")

pytest_plugins = [
    # First: the other fixture modules import it.
    "tests.fixtures.server",
    "tests.fixtures.store",
    "tests.fixtures.apis",
    "tests.fixtures.hf_hub",
    "tests.fixtures.model",
    "tests.fixtures.long_context_model",
    "tests.fixtures.registry",
    "tests.fixtures.test_engine",
    "tests.fixtures.diffusers_model",
    "tests.fixtures.vllm_model",
    "tests.fixtures.vision_projector",
]
