pytest_plugins = [
    "tests.fixtures.model",
    "tests.fixtures.server",
]
