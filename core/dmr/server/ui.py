"""`/ui`: a small web page served by the server itself (plain HTML/CSS/JS, no build step).

The page talks only to this server's public routes (`/models`, `/models/create`,
`/engines/ps`, `/engines/v1/...`), so it needs no API of its own; its files ship
inside the `dmr` package (`static/ui/`) and load nothing from the network.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, jsonify, redirect, send_from_directory

__all__ = ["STATIC_DIR", "blueprint"]

STATIC_DIR = Path(__file__).parent / "static" / "ui"

blueprint = Blueprint(
    "dmr_ui", __name__, static_folder=str(STATIC_DIR), static_url_path="/ui/static"
)


@blueprint.get("/ui")
async def page() -> Response:
    response = await send_from_directory(STATIC_DIR, "index.html")
    # The page is tiny and changes with the installed version: never serve a stale one.
    response.headers["Cache-Control"] = "no-cache"
    return response


@blueprint.get("/ui/")
async def page_slash() -> Response:
    # Relative links in the page are written for `/ui`; send `/ui/` there.
    return redirect("/ui", 308)  # type: ignore[return-value]


@blueprint.errorhandler(OSError)
async def unreadable(_: OSError) -> Response:
    # A static file name the file system refuses outright (ENAMETOOLONG, ...)
    # names no file: 404, not a 500 (Path.is_file lets those errors through).
    response = jsonify(
        {"error": {"message": "no such file", "type": "not_found_error", "code": "not_found"}}
    )
    response.status_code = 404
    return response
