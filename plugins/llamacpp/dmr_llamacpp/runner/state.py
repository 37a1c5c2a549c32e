"""What the runner's routes share: the loaded model and its engines, and the request body
(decoded here; `requests.py` reads it into the route's record)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dmr.sdk.runner import BadRequest
from quart import Quart, current_app, request

from dmr_llamacpp.runner.batching import BatchedGenerator
from dmr_llamacpp.runner.chat import ChatTemplate
from dmr_llamacpp.runner.media import ImageLimits
from dmr_llamacpp.runner.model import LoadedModel
from dmr_llamacpp.runner.pooling import Pooler
from dmr_llamacpp.runner.requests import DEFAULT_MEDIA_MARKER, ChatPrompt
from dmr_llamacpp.settings import WorkerSettings

if TYPE_CHECKING:  # libmtmd is loaded only for a model with a projector
    from dmr_llamacpp.runner.vision import VisionProjector

__all__ = ["RunnerState", "install_state", "parse_body", "request_body", "runner_state"]

_EXTENSION = "dmr_llamacpp_runner_state"


@dataclass
class RunnerState:
    """What the routes need once the model is loaded (None while loading).

    The `require_*` lookups answer 400 while the model loads, or when this runner's
    mode has no such engine (completions from an embedding runner, say).
    """

    model_name: str
    mode: str
    settings: WorkerSettings
    model: LoadedModel | None = None
    generator: BatchedGenerator | None = None
    pooler: Pooler | None = None
    template: ChatTemplate | None = None
    # The model's projector (`--mmproj`): None for a text-only model.
    projector: VisionProjector | None = None
    image_limits: ImageLimits = field(default_factory=ImageLimits.from_environment)
    created: int = 0
    load_error: str | None = None

    @property
    def media_marker(self) -> str:
        """What stands for an image in a rendered prompt."""
        return self.projector.marker if self.projector is not None else DEFAULT_MEDIA_MARKER

    def require_projector(self) -> VisionProjector:
        """The projector, or a 400 for a request with images to a text-only model."""
        if self.projector is None:
            if self.model is None:
                raise BadRequest("the model is still loading")
            raise BadRequest(
                f"the model {self.model_name} does not accept images: it has no multimodal "
                "projector (mmproj)",
                "messages",
            )
        return self.projector

    def require_model(self) -> LoadedModel:
        if self.model is None:
            raise BadRequest("the model is still loading")
        return self.model

    def require_generator(self) -> BatchedGenerator:
        if self.generator is None:
            if self.model is not None:
                raise BadRequest(f"this runner serves {self.mode}, not completions")
            raise BadRequest("the model is still loading")
        return self.generator

    def require_pooler(self) -> Pooler:
        if self.pooler is None:
            if self.model is not None:
                raise BadRequest(
                    f"this runner serves {self.mode}; start it in embedding or reranking mode"
                )
            raise BadRequest("the model is still loading")
        return self.pooler

    def render_prompt(
        self, prompt: ChatPrompt, messages: Sequence[dict[str, Any]] | None = None
    ) -> str:
        """The chat template applied to `prompt`: its messages (or `messages`, some of
        them kept by truncation), its tools and its variables."""
        assert self.template is not None or self.model is None
        if self.template is None:
            raise BadRequest("the model is still loading")
        kept = list(prompt.messages if messages is None else messages)
        try:
            return self.template.render(kept, tools=prompt.tools, extra=prompt.variables)
        except ValueError as error:
            raise BadRequest(str(error), "messages") from None


def install_state(app: Quart, state: RunnerState) -> None:
    app.extensions[_EXTENSION] = state


def runner_state() -> RunnerState:
    """The state of the app serving the current request."""
    state: RunnerState = current_app.extensions[_EXTENSION]
    return state


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def request_body() -> dict[str, Any]:
    """The current request's JSON object body."""
    return parse_body(await request.get_data(cache=True, as_text=False, parse_form_data=False))
