"""Go duration strings ("5m", "1h30m", "300ms", "-1") as used by DMR and Ollama keep_alive."""

from __future__ import annotations

import re

__all__ = ["format_duration", "parse_duration"]

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(value: str | int | float) -> float:
    """Seconds. A bare number is seconds (Ollama accepts `keep_alive: 300`); "-1" is negative."""
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):  # JSON bodies carry lists and objects too
        raise TypeError(f"a duration is a string or a number, not {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError("empty duration")
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    position, total = 0, 0.0
    for match in _PART.finditer(body):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(body) or position == 0:
        raise ValueError(f"invalid duration {value!r} (expected e.g. 5m, 1h30m, 0, -1)")
    return sign * total


def format_duration(seconds: float) -> str:
    if seconds < 0:
        return "-1"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{secs}s" if secs else "",
    ]
    return "".join(parts) or "0s"
