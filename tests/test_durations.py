from __future__ import annotations

import pytest
from dmr.durations import format_duration, parse_duration
from dmr.settings import parse_idle_timeout


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("300ms", 0.3),
        ("0", 0),
        ("-1", -1),
        ("-1m", -60),
        ("90", 90),
        ("1.5h", 5400),
        ("2h0m10s", 7210),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5 minutes", "m5", "5x", "--1"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_idle_timeout_is_clamped_like_dmr() -> None:
    assert parse_idle_timeout("0") == 0
    assert parse_idle_timeout("10s") == 60
    assert parse_idle_timeout("48h") == 24 * 3600
    assert parse_idle_timeout("5m") == 300


def test_format_duration() -> None:
    assert format_duration(5400) == "1h30m"
    assert format_duration(-5) == "-1"
