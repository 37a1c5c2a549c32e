"""Placeholder blueprint: filled in by its owner."""

from __future__ import annotations

from quart import Blueprint

blueprint = Blueprint("dmr_engines_api", __name__)
