"""Each plugin is held to core's standards as its own distribution.

Its test suite runs from that plugin alone: the tests may depend on dmr (its
`dmr.testing` helpers included), the plugin and their own files, never on this
repository's `tests` package, so a plugin is testable where only it and dmr are
installed. And `mypy --strict` checks its package as it checks core's.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGINS = sorted(tests.parent for tests in (REPO / "plugins").glob("*/tests"))


def _imported_modules(source: Path) -> Iterator[str]:
    """Absolute module names `source` imports, including `pytest_plugins` entries."""
    tree = ast.parse(source.read_text(), filename=str(source))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "pytest_plugins"
            for target in node.targets
        ):
            for constant in ast.walk(node.value):
                if isinstance(constant, ast.Constant) and isinstance(constant.value, str):
                    yield constant.value


def test_there_are_plugin_suites_to_check() -> None:
    assert {plugin.name for plugin in PLUGINS} >= {"apis", "diffusers", "llamacpp", "vllm"}


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda plugin: plugin.name)
def test_a_plugin_suite_never_imports_the_repository_tests_package(plugin: Path) -> None:
    offenders = [
        f"{source.relative_to(REPO)}: {module}"
        for source in sorted((plugin / "tests").rglob("*.py"))
        for module in _imported_modules(source)
        if module == "tests" or module.startswith("tests.")
    ]
    assert not offenders, f"move what these need into dmr.testing or the plugin: {offenders}"


@pytest.mark.slow
@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda plugin: plugin.name)
def test_a_plugin_suite_is_planned_from_a_copy_of_the_plugin_alone(
    plugin: Path, tmp_path: Path
) -> None:
    """Collected, and every test's fixtures resolved (`--setup-plan` runs nothing), from
    a copy outside the repository with the repository's pytest settings (asyncio mode,
    markers, warnings) and nothing else of it: an import of `tests.*`, a fixture of the
    root conftest or a path into the repository fails."""
    copy = tmp_path / plugin.name
    shutil.copytree(
        plugin, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache")
    )
    # The repository root must not be importable (`import tests` would find it).
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--setup-plan",
            "-p",
            "no:cacheprovider",
            "-c",
            str(REPO / "pyproject.toml"),
            "--rootdir",
            str(copy),
            "tests",
        ],
        cwd=copy,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout[-3000:] + result.stderr[-3000:]
    # Exit code 5 (nothing collected) fails here too: an empty suite proves nothing.
    assert result.returncode == 0, output
    collected = re.search(r"^collected (\d+) items?", result.stdout, re.MULTILINE)
    assert collected is not None and int(collected.group(1)) > 0, output


def test_mypy_checks_every_plugin_package_strictly() -> None:
    """`mypy` with no arguments (scripts/test, tox's type env) checks pyproject's files."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    packages = {
        init.parent.relative_to(REPO).as_posix()
        for root in [*PLUGINS, REPO / "tests" / "plugins" / "dmr_test_engine"]
        for init in root.glob("dmr_*/__init__.py")
    }
    assert len(packages) > len(PLUGINS)
    assert packages <= set(config["files"]), sorted(packages - set(config["files"]))
    assert config["strict"] is True
