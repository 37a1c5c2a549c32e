"""Lifting the app's request-body cap (`MAX_CONTENT_LENGTH`) for chosen upload routes.

Quart sizes a request's body limit when it builds the request object, before any
route or `before_request` hook runs, so a route that takes gigabytes (a model
tarball, a GGUF blob) cannot lift it itself: the app's request class must. Each
call wraps the current class once more, so core and plugins can each lift theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quart import Quart
from quart.wrappers import Request

from dmr.server.uploads import BoundedBody

__all__ = ["lift_body_limit"]

# (method, path) -> whether that request may have a body of any size.
UploadRoute = Callable[[str, str], bool]


def lift_body_limit(
    app: Quart, name: str, is_upload: UploadRoute, *, bounded: bool = False
) -> None:
    """No body cap for the requests `is_upload(method, path)` picks, on `app`.

    `name` makes a second call for the same routes do nothing. `bounded` gives those
    requests a `BoundedBody`: the route must stream it (`async for chunk in
    request.body`), and memory holds at most a buffer of it.
    """
    base: type[Request] = app.request_class
    marker = f"_dmr_lifted_{name}"
    if getattr(base, marker, False):
        return

    class LiftedLimitRequest(base):  # type: ignore[valid-type,misc]
        def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any):
            upload = is_upload(method, path)
            if upload:
                kwargs["max_content_length"] = None
            super().__init__(method, scheme, path, *args, **kwargs)
            if upload and bounded:
                self.body = BoundedBody(self.content_length, None)

    setattr(LiftedLimitRequest, marker, True)
    app.request_class = LiftedLimitRequest
