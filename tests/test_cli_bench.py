"""`dmr bench` through the real CLI, a live server and SmolLM2."""

from __future__ import annotations

import json

import pytest
from dmr.cli.bench import percentile

from tests.fixtures.server import DmrServer

pytestmark = [pytest.mark.llama, pytest.mark.slow, pytest.mark.xdist_group("smollm2")]


def test_percentile_interpolates() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([float(v) for v in range(1, 101)], 0.95) == pytest.approx(95.05)


def test_bench_json_per_level(smollm2_server: DmrServer) -> None:
    result = smollm2_server.cli(
        "bench",
        "ai/smollm2",
        "--concurrency",
        "1,2",
        "--duration",
        "3s",
        "--max-tokens",
        "16",
        "--json",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(result.stdout)
    assert report["model"] == "ai/smollm2"
    levels = report["levels"]
    assert [level["concurrency"] for level in levels] == [1, 2]
    for level in levels:
        assert level["errors"] == 0 and level["first_error"] is None
        assert level["requests"] >= level["concurrency"]
        assert level["duration_s"] >= 3.0
        # At most max_tokens per request, and at least one.
        assert level["requests"] <= level["completion_tokens"] <= 16 * level["requests"]
        expected_rate = level["completion_tokens"] / level["duration_s"]
        assert level["tokens_per_second"] == pytest.approx(expected_rate, rel=0.01)
        assert 0 < level["ttft_p50_ms"] <= level["ttft_p95_ms"]
        assert 0 < level["latency_p50_ms"] <= level["latency_p95_ms"]
        assert level["ttft_p50_ms"] <= level["latency_p50_ms"]


def test_bench_table_and_unknown_model(smollm2_server: DmrServer) -> None:
    table = smollm2_server.cli(
        "bench", "smollm2", "--concurrency", "1", "--duration", "1s", "--max-tokens", "4"
    )
    assert table.returncode == 0, table.stderr + table.stdout
    assert "tok/s" in table.stdout and "TTFT p50" in table.stdout

    missing = smollm2_server.cli("bench", "ai/not-here", "--duration", "1s")
    assert missing.returncode == 1
    assert "not-here" in missing.stderr

    bad = smollm2_server.cli("bench", "smollm2", "--concurrency", "0,x")
    assert bad.returncode != 0
