"""The reliability suite: every test here carries the `reliability` marker, and the
figures the tests record (counts, durations, peak memory) are printed at the end of
the run and kept in `test-artifacts/reliability.json` (see figures.py), so
docs/reliability.md quotes what was measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability.figures import FIGURES

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.reliability)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("reliability figures")
        for scenario, figures in FIGURES.items():
            terminalreporter.write_line(f"{scenario}: {json.dumps(figures, sort_keys=True)}")
