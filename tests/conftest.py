pytest_plugins = [
    # First: the other fixture modules import it.
    "tests.fixtures.server",
    "tests.fixtures.store",
    "tests.fixtures.apis",
    "tests.fixtures.hf_hub",
    "tests.fixtures.model",
    "tests.fixtures.registry",
    "tests.fixtures.test_engine",
    "tests.fixtures.diffusers_model",
    "tests.fixtures.vllm_model",
]
