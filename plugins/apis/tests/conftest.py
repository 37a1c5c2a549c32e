"""Fixtures for the dialects' own tests (helpers live in `apis_harness`, a name no
other test directory uses, so imports cannot pick up another `conftest`)."""

from apis_harness import harness, make_harness

__all__ = ["harness", "make_harness"]
