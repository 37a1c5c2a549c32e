"""Figures a reliability test measured, keyed by scenario.

Each `record` is merged into `test-artifacts/reliability.json` at once (under a
file lock, since xdist workers record side by side) and kept here for the
end-of-run summary that conftest.py prints.
"""

from __future__ import annotations

import json
from pathlib import Path

from filelock import FileLock

ARTIFACT = Path(__file__).parents[2] / "test-artifacts" / "reliability.json"
FIGURES: dict[str, dict[str, object]] = {}


def record(scenario: str, **figures: object) -> None:
    FIGURES.setdefault(scenario, {}).update(figures)
    print(f"[reliability] {scenario}: {json.dumps(figures, sort_keys=True)}")
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(ARTIFACT) + ".lock"):
        saved: dict[str, dict[str, object]] = {}
        if ARTIFACT.exists():
            try:
                saved = json.loads(ARTIFACT.read_text())
            except ValueError:
                saved = {}
        saved.setdefault(scenario, {}).update(figures)
        ARTIFACT.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
