"""Commands as Docker Model Runner's users type them (issue 27): `run MODEL` with a
prompt of several words, `ls [MODEL]` with a CONTEXT column, `ps` with UNTIL."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dmr.cli.runners import human_duration, until

from tests.fixtures.server import DmrServer
from tests.fixtures.test_engine import add_test_model, chat_body, ps, wait_for
from tests.test_packaging import tiny_gguf


def _cli(server: DmrServer, *args: str) -> subprocess.CompletedProcess[str]:
    """`dmr ARGS` with a wide terminal, so that tables keep one row per line."""
    return subprocess.run(
        [sys.executable, "-m", "dmr", *args],
        env={**server.env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _table(stdout: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, rows of cells) of a table whose cells hold no double space."""
    header, *rows = [line.strip() for line in stdout.splitlines() if line.strip()]
    return re.split(r"\s{2,}", header), [re.split(r"\s{2,}", row) for row in rows]


def test_run_joins_the_words_of_the_prompt(test_engine_server: DmrServer) -> None:
    add_test_model(test_engine_server.models_path, "test/a")

    ran = _cli(test_engine_server, "run", "test/a", "hello", "world,", "how are", "you?")

    assert ran.returncode == 0, ran.stderr
    assert "echo: hello world, how are you?" in ran.stdout


def test_ls_filters_to_a_model_and_shows_its_context(
    dmr_server_factory: Callable[..., DmrServer], tmp_path: Path
) -> None:
    server = dmr_server_factory()
    # One creation time for every package: the same file then gives the same ID, whatever
    # second each `dmr package` runs in (the `ls -q` check below relies on it).
    server.env["SOURCE_DATE_EPOCH"] = "1700000000"
    gguf = tiny_gguf(tmp_path / "tiny.gguf")  # trained context: 2048 (llama.context_length)
    for args in (
        ("ai/tiny:v1",),
        ("--context-size", "1024", "ai/tiny:v2"),
        ("other/model",),
    ):
        packaged = _cli(server, "package", "--gguf", str(gguf), *args)
        assert packaged.returncode == 0, packaged.stderr

    listed = _cli(server, "ls")
    assert listed.returncode == 0, listed.stderr
    header, rows = _table(listed.stdout)
    assert header == ["MODEL NAME", "PARAMETERS", "QUANTIZATION", "ARCHITECTURE", "MODEL ID",
                      "CREATED", "CONTEXT", "SIZE"]  # fmt: skip
    context = {row[0]: row[header.index("CONTEXT")] for row in rows}
    # The packaged context size, else the GGUF's trained one.
    assert context == {"ai/tiny:v1": "2048", "ai/tiny:v2": "1024", "other/model:latest": "2048"}

    # A bare name is under ai/, as `docker model ls smollm2` is; a repository matches
    # each of its tags, `repo:tag` one tag.
    for wanted, names in (
        ("tiny", {"ai/tiny:v1", "ai/tiny:v2"}),
        ("ai/tiny", {"ai/tiny:v1", "ai/tiny:v2"}),
        ("tiny:v2", {"ai/tiny:v2"}),
        ("other/model", {"other/model:latest"}),
        ("other/model:v9", set()),
        ("nosuch", set()),
    ):
        filtered = _cli(server, "ls", wanted)
        assert filtered.returncode == 0, filtered.stderr
        assert {row[0] for row in _table(filtered.stdout)[1]} == names, wanted

    as_json = json.loads(_cli(server, "ls", "--json", "ai/tiny:v1").stdout)
    assert [model["tags"] for model in as_json] == [["ai/tiny:v1"]]
    quiet = _cli(server, "ls", "-q", "other/model").stdout.split()
    assert quiet == [as_json[0]["id"][7:19]]  # one file, one blob: the same ID
    openai = json.loads(_cli(server, "ls", "--openai", "tiny").stdout)
    assert sorted(item["id"] for item in openai["data"]) == ["ai/tiny:v1", "ai/tiny:v2"]


def test_ps_until_is_when_the_keep_alive_ends(test_engine_server: DmrServer) -> None:
    """The server's idle timeout is 60 s here; a model configured with keep-alive -1
    stays forever."""
    add_test_model(test_engine_server.models_path, "test/a")
    add_test_model(test_engine_server.models_path, "test/b")
    configured = _cli(test_engine_server, "configure", "--keep-alive", "-1", "test/b")
    assert configured.returncode == 0, configured.stderr
    with test_engine_server.client() as client:
        for model in ("test/a", "test/b"):
            assert client.post("/engines/v1/chat/completions", json=chat_body(model)).is_success
    wait_for(lambda: all(not r["in_use"] for r in ps(test_engine_server)), message="idle")

    listed = _cli(test_engine_server, "ps")

    assert listed.returncode == 0, listed.stderr
    header, rows = _table(listed.stdout)
    assert header[0] == "MODEL NAME" and header[-1] == "UNTIL"
    until_column = {row[0]: row[-1] for row in rows}
    assert until_column["test/b"] == "Forever"
    assert re.fullmatch(r"(About a minute|[1-5]\d seconds) from now", until_column["test/a"])


def _iso(seconds_ago: float, now: float) -> str:
    return datetime.fromtimestamp(now - seconds_ago, UTC).isoformat()


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"loading": True, "keep_alive": "5m"}, "Loading..."),
        ({"keep_alive": "-1", "last_used": "x"}, "Forever"),
        ({"keep_alive": "5m", "in_use": True, "last_used": "x"}, "5 minutes from now"),
        ({"keep_alive": "5m", "last_used": 90.0}, "3 minutes from now"),
        ({"keep_alive": "5m", "last_used": 290.0}, "10 seconds from now"),
        ({"keep_alive": "5m", "last_used": 400.0}, "Expiring"),
        ({"keep_alive": "0s", "last_used": 1.0}, "Expiring"),
        ({"keep_alive": "24h0m0s", "last_used": 0.0}, "24 hours from now"),
    ],
)
def test_until_words_it_as_docker_model_ps(item: dict[str, object], expected: str) -> None:
    """Docker Model Runner's `formatUntil` (cmd/cli/commands/ps.go), case by case."""
    now = 1_800_000_000.0
    if isinstance(item.get("last_used"), float):
        item = {**item, "last_used": _iso(float(item["last_used"]), now)}  # type: ignore[arg-type]
    assert until(item, now) == expected


def test_human_duration_is_docker_units() -> None:
    """go-units' HumanDuration, which `docker model ps` and `ls` print."""
    assert [human_duration(s) for s in (0.5, 1, 59, 60, 119, 120, 3599)] == [
        "Less than a second", "1 second", "59 seconds", "About a minute", "About a minute",
        "2 minutes", "59 minutes",
    ]  # fmt: skip
    assert [human_duration(h * 3600) for h in (1, 2, 47, 48, 24 * 14, 24 * 60, 24 * 800)] == [
        "About an hour", "2 hours", "47 hours", "2 days", "2 weeks", "2 months", "2 years",
    ]  # fmt: skip
