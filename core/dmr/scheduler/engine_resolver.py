"""Which engine runs a model: the format the model is in, then the engine asked for or
the one its format prefers (docs/compatibility.md §2).

The resolver is given the engines and the model formats the plugin manager
collected; it asks no plugin itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from dmr.engine_install_hints import install_hint
from dmr.errors import InvalidRequestError

if TYPE_CHECKING:
    from dmr.records import EngineSpec, Mode, ModelFormat
    from dmr.store import StoredModel

__all__ = ["EngineResolver"]


class EngineResolver:
    def __init__(self, engines: Mapping[str, EngineSpec], formats: Iterable[ModelFormat]) -> None:
        self.engines = dict(engines)
        self.formats = {fmt.name: fmt for fmt in formats}

    def model_format(self, stored: StoredModel) -> str:
        """The format the model's config names, else the plugin format whose media types
        its layers carry (`ModelFormat.media_types`): the store knows only the built-in
        ones, so a third-party format's model need not name itself in its config."""
        if stored.format:
            return stored.format
        layer_types = {
            str(layer.get("mediaType"))
            for layer in stored.manifest.get("layers") or []
            if isinstance(layer, dict)
        }
        for fmt in self.formats.values():
            if layer_types & set(fmt.media_types):
                return fmt.name
        return ""

    def engine_for(self, stored: StoredModel, mode: Mode, backend: str | None) -> EngineSpec:
        """`backend` when given, else the engine preferred for the model's format; either
        must serve `mode`."""
        model_format = self.model_format(stored)
        if backend:
            spec = self._named(backend, model_format)
        else:
            spec = self._preferred(stored, model_format)
        if mode not in spec.modes:
            modes = ", ".join(sorted(m.value for m in spec.modes))
            raise InvalidRequestError(
                f"engine {spec.name!r} cannot serve {mode.value} requests (it serves: {modes})"
            )
        return spec

    def _named(self, backend: str, model_format: str) -> EngineSpec:
        spec = self.engines.get(backend)
        if spec is None:
            installed = ", ".join(sorted(self.engines)) or "none"
            raise InvalidRequestError(
                f"engine {backend!r} is not installed (installed: {installed})"
            )
        if model_format and spec.formats and model_format not in spec.formats:
            raise InvalidRequestError(
                f"engine {backend!r} cannot run {model_format or 'this'} models"
            )
        return spec

    def _preferred(self, stored: StoredModel, model_format: str) -> EngineSpec:
        """The format's preferred engine, else the first installed one that runs it."""
        preferred = self.formats.get(model_format)
        spec = self.engines.get(preferred.preferred_engine) if preferred else None
        if spec is not None:
            return spec
        capable = [s for s in self.engines.values() if model_format in s.formats]
        if not capable:
            wanted = preferred.preferred_engine if preferred else "an engine"
            raise InvalidRequestError(
                f"{stored.tags[0] if stored.tags else stored.id} is a "
                f"{model_format or 'unknown-format'} model and needs {wanted}, "
                f"which is not installed ({install_hint(wanted)})"
            )
        return capable[0]
