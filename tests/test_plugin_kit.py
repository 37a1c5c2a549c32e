"""Plugins use only the plugin kit (docs/plugins.md): every module of every bundled
plugin package, and of the test engine plugin, imports from `dmr` only through
`dmr.sdk`, `dmr.sdk.runner` and `dmr.sdk.dialect`. The kit itself exports what it
lists, and a runner that imports its kit loads no server code.

Imports are read from the source with `ast`: module-level ones, those inside
functions and those under `if TYPE_CHECKING:` alike.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT = ("dmr.sdk", "dmr.sdk.runner", "dmr.sdk.dialect", "dmr.sdk.cluster")
PACKAGES = sorted(
    [
        *(REPO / "plugins").glob("*/dmr_*/__init__.py"),
        REPO / "tests" / "plugins" / "dmr_test_engine" / "dmr_test_engine" / "__init__.py",
    ]
)


def dmr_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of `dmr` or a module under it in `tree`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            if node.module == "dmr":  # `from dmr import sdk` names a module too
                modules = [f"dmr.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(node.lineno, m) for m in modules if m == "dmr" or m.startswith("dmr.")]
    return found


def outside_the_kit(package: Path) -> list[str]:
    wrong = []
    for path in sorted(package.parent.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, module in dmr_imports(tree):
            if module not in KIT:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return wrong


def test_every_plugin_package_is_checked() -> None:
    names = {package.parent.name for package in PACKAGES}
    assert {"dmr_apis", "dmr_llamacpp", "dmr_diffusers", "dmr_vllm", "dmr_gpus"} <= names
    assert "dmr_test_engine" in names


@pytest.mark.parametrize("package", PACKAGES, ids=lambda package: package.parent.name)
def test_a_plugin_imports_dmr_only_through_the_kit(package: Path) -> None:
    assert outside_the_kit(package) == []


def test_the_rule_sees_every_kind_of_import() -> None:
    """Module-level, function-level and TYPE_CHECKING imports, `import dmr` and
    `from dmr import x` are all caught; the kit's own modules are not."""
    source = textwrap.dedent(
        """
        import dmr
        import dmr.errors as errors
        from dmr import records, sdk
        from dmr.sdk import hookimpl
        from dmr.sdk.dialect import call_runner
        from dmr_apis.common import body
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from dmr.store import Store

        def view():
            from dmr.server.proxy import proxy_to_runner
        """
    )
    modules = [module for _, module in dmr_imports(ast.parse(source))]
    outside = [module for module in modules if module not in KIT]
    assert outside == ["dmr", "dmr.errors", "dmr.records", "dmr.store", "dmr.server.proxy"]


@pytest.mark.parametrize("tier", KIT)
def test_each_kit_tier_exports_what_it_lists(tier: str) -> None:
    module = importlib.import_module(tier)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_importing_a_tier_loads_nothing_until_a_name_is_used() -> None:
    """A runner loads no server, scheduler or plugin manager code through the kit, and a
    plugin's CLI command no Quart."""
    script = textwrap.dedent(
        """
        import json, sys
        import dmr.sdk, dmr.sdk.dialect
        from dmr.sdk.runner import BadRequest, serve_runner
        from dmr.sdk.dialect import connect, fail
        print(json.dumps(sorted(sys.modules)))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout)
    heavy = ("dmr.server", "dmr.scheduler", "dmr.plugins", "dmr.distribution", "pluggy", "httpx")
    assert [m for m in modules if m in heavy or m.startswith(tuple(f"{h}." for h in heavy))] == []
